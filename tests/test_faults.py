"""Fault injection: the real commands under faults, each checked against its promise.

Every test records a row (fault, promise, result); `conftest.pytest_terminal_summary`
prints the table at the end of the run (README, "Reliability", is a copy of it). Faults
already covered elsewhere are listed there by name: SIGKILL mid-run and resume
(test_train), SIGTERM (test_train, test_preemption), NaN (test_train), a mesh change
between save and resume (test_sharding), a gs:// bucket, endpoint or config.json that
cannot be used (test_gcs).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time

import numpy as np
import pytest
from conftest import record_fault, run_python
from test_train import losses
from test_train import train_args as _train_args


def train_args(workdir, data_dir, steps=20):
    """test_train's tiny run, with a decay length that does not depend on train.steps, so
    a 20-step run resumed to 30 steps must match a straight 30-step run."""
    return _train_args(workdir, data_dir, steps) + ["--config.optim.decay_steps=30"]

# In-process fault injection for the training command: argv[1] names the fault.
INJECT = """
import os, signal, sys
fault = sys.argv.pop(1)
from gpt_jax import cli, loop, train
import orbax.checkpoint as ocp
if fault == "save_fails_at_20":  # the step-20 save fails in orbax's background thread
    handler = ocp.StandardCheckpointHandler
    original = handler.async_save
    class DiskFull:  # a commit future, as the background thread waits on them
        def __init__(self, path):
            self.path = path
        def result(self, timeout=None):
            raise OSError(28, "No space left on device", self.path)
    async def async_save(self, directory, *args, **kwargs):
        futures = await original(self, directory, *args, **kwargs)
        if "/20." in str(directory) or "/20/" in str(directory):
            futures = list(futures or []) + [DiskFull(str(directory))]
        return futures
    handler.async_save = async_save
    build = loop.build_trainer
    def build_slow(*args, **kwargs):  # steps after 20 take 1 s, like a real model's
        trainer = build(*args, **kwargs)
        step_fn = trainer.train_step
        def step(state, *rest):
            if int(state["step"]) >= 20:
                import time
                time.sleep(1.0)
            return step_fn(state, *rest)
        trainer.train_step = step
        return trainer
    loop.build_trainer = build_slow
if fault == "sigterm_in_startup":  # the notice arrives while the trainer is being built
    build = loop.build_trainer
    def build_and_term(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)
    loop.build_trainer = build_and_term
cli.define_run_flags()
cli.run(train.main)
"""


def last_line(out) -> str:
    lines = out.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def one_line_error(out, status: int, *needles: str) -> None:
    assert out.returncode == status, (out.returncode, out.stderr[-3000:])
    line = last_line(out)
    assert line.startswith("error: "), out.stderr[-3000:]
    for needle in needles:
        assert needle in line, line
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def ckpt_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 30-step run (the reference) and a 20-step run that tests copy and
    damage."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    for name, steps in (("ref", 30), ("base20", 20)):
        out = run_python(train_args(root / name, data, steps=steps))
        assert out.returncode == 0, out.stderr[-3000:]
    assert ckpt_steps(root / "base20") == [10, 20]
    assert (root / "base20" / "checkpoints" / "20" / "checksums.json").exists()
    return {"root": root, "data": data, "losses": losses(root / "ref")}


def twenty_steps(straight, name):
    """A copy of the 20-step run (checkpoints 10 and 20, both sealed)."""
    workdir = straight["root"] / name
    shutil.copytree(straight["root"] / "base20", workdir)
    return workdir


def biggest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("part,damage", [("params", "flip"), ("opt_state", "truncate"),
                                         ("meta", "delete")])
def test_damaged_newest_checkpoint_falls_back(straight, part, damage):
    workdir = twenty_steps(straight, f"damaged_{part}")
    target = biggest_file(workdir / "checkpoints" / "20" / part)
    if damage == "flip":
        data = bytearray(open(target, "rb").read())
        data[len(data) // 2] ^= 0x40
        open(target, "wb").write(bytes(data))
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) // 2)
    else:
        os.remove(target)
    out = run_python(train_args(workdir, straight["data"], steps=30))
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "step 20" in warnings[0], out.stderr[-3000:]
    assert "resuming from step 10" in out.stdout
    assert os.listdir(workdir / "quarantine")  # kept for inspection
    assert 10 in ckpt_steps(workdir) or 30 in ckpt_steps(workdir)
    got, want = losses(workdir), straight["losses"]
    np.testing.assert_array_equal([got[s] for s in range(11, 31)],
                                  [want[s] for s in range(11, 31)])
    record_fault(f"{part} of the newest checkpoint: {damage}",
                 "one warning naming the step, resume from the older one, losses exact",
                 "passed")


def test_failed_async_save_stops_promptly(straight):
    workdir = straight["root"] / "save_fails"
    t = time.time()
    out = run_python(["-c", INJECT, "save_fails_at_20"]
                     + train_args(workdir, straight["data"], steps=40)[2:])
    elapsed = time.time() - t
    one_line_error(out, 1, "saving a checkpoint in", str(workdir / "checkpoints"),
                   "last good checkpoint is step 10")
    assert ckpt_steps(workdir) == [10]
    logged = max(losses(workdir))
    assert logged < 30, logged  # noticed while training, not at the next (step-30) save
    assert elapsed < 240, elapsed  # no minutes-long wait on orbax's timeouts
    record_fault("asynchronous save fails (disk full) at step 20",
                 "exit 1 as soon as the background write fails (before the next save), "
                 "one line naming the directory, step 10 kept",
                 f"passed (stopped after step {logged})")


def test_unwritable_checkpoint_dir_fails_before_compile(straight):
    workdir = straight["root"] / "blocked"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("a file where the directory should be")
    out = run_python(train_args(workdir, straight["data"], steps=5))
    one_line_error(out, 1, str(workdir / "checkpoints"), "cannot be written")
    assert not (workdir / "metrics.jsonl").exists()  # stopped before training
    record_fault("checkpoints/ cannot be written", "exit 1 before training, one line",
                 "passed")


def test_sigterm_during_startup_exits_zero_and_resumes(straight):
    workdir = straight["root"] / "startup_term"
    out = run_python(["-c", INJECT, "sigterm_in_startup"]
                     + train_args(workdir, straight["data"], steps=30)[2:])
    assert out.returncode == 0, out.stderr[-3000:]
    assert ckpt_steps(workdir) == [0]  # the fresh state, saved
    again = run_python(train_args(workdir, straight["data"], steps=30))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 0" in again.stdout
    got = losses(workdir)
    np.testing.assert_array_equal([got[s] for s in range(1, 31)],
                                  [straight["losses"][s] for s in range(1, 31)])
    record_fault("SIGTERM during start-up", "exit 0, state saved, resume exact", "passed")


def test_another_model_shape_keeps_the_run(straight):
    workdir = twenty_steps(straight, "shape")
    before = (workdir / "config.json").read_text()
    out = run_python(train_args(workdir, straight["data"], steps=30)
                     + ["--config.model.d_model=64"])
    one_line_error(out, 2, "holds a run of another model shape", "model.d_model=32 (now 64)")
    assert (workdir / "config.json").read_text() == before
    assert ckpt_steps(workdir) == [10, 20]
    record_fault("rerun with another model shape",
                 "exit 2, one line naming the field, config.json and checkpoints kept",
                 "passed")


def test_truncated_token_file(straight, tmp_path):
    token_dir = tmp_path / "tokens"
    args = train_args(tmp_path / "run", straight["data"], steps=1)
    first = run_python(args + [f"--config.data.token_dir={token_dir}"])
    assert first.returncode == 0, first.stderr[-3000:]
    shard = sorted(token_dir.glob("*/train-*.bin"))[0]
    os.truncate(shard, os.path.getsize(shard) // 2)
    out = run_python(args + [f"--config.data.token_dir={token_dir}"])
    one_line_error(out, 2, "data.token_dir", shard.name, "shorter than")
    record_fault("truncated token file", "exit 2 before compile, one line naming the file",
                 "passed")


@pytest.mark.parametrize("extra,status,needles", [
    (["--config.model.nonexistent=1"], 2, ["--config.model.nonexistent: no such config field"]),
    (["--config=experiments/no_such.py"], 2, ["experiments/no_such.py", "No such file"]),
    (["--config.model.n_layer=two"], 2, ["--config.model.n_layer=two"]),
    (["--config.model.n_head=5"], 2, ["model.d_model=32 is not divisible by model.n_head=5"]),
])
def test_bad_command_lines(straight, extra, status, needles):
    out = run_python(train_args(straight["root"] / "cli", straight["data"], steps=1) + extra)
    one_line_error(out, status, *needles)
    record_fault(f"bad flag {extra[0]}", f"exit {status}, one line", "passed")


def test_bad_files_are_one_line(straight, tmp_path):
    workdir = twenty_steps(straight, "files")
    # a malformed task file for evaluate
    task = tmp_path / "task.json"
    task.write_text('{"type": "multiple_choice", "eval": "x.jsonl",\n "shots": [0,]}')
    out = run_python(["-m", "gpt_jax.evaluate", f"--workdir={workdir}", f"--tasks={task}"])
    one_line_error(out, 2, f"{task}:2", "not JSON")
    # a malformed JSONL for fine-tuning
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n')
    out = run_python(["-m", "gpt_jax.finetune", "--config=experiments/finetune/jsonl.py",
                      f"--init_from={workdir}", f"--workdir={tmp_path / 'ft'}",
                      f"--config.finetune.train_jsonl={bad}",
                      f"--config.finetune.val_jsonl={bad}"])
    one_line_error(out, 2, f"{bad}:2", "not JSON")
    # a damaged tokenizer file in the workdir
    (workdir / "tokenizer.json").write_text("{broken")
    out = run_python(["-m", "gpt_jax.sample", f"--workdir={workdir}", "--max_new_tokens=4"])
    one_line_error(out, 2, "tokenizer.json", "not a readable tokenizer")
    # plot without metrics
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((workdir / "config.json").read_text())
    out = run_python(["-m", "gpt_jax.plot", f"--workdirs={empty}", f"--out={tmp_path}/x.png"])
    one_line_error(out, 2, "metrics.jsonl not found")
    record_fault("malformed task JSON, JSONL, tokenizer file; plot without metrics",
                 "one line naming file:line, no traceback", "passed")


def test_undecodable_corpus_is_named(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_bytes(bytes(range(128, 256)) * 8)
    out = run_python(train_args(tmp_path / "run", tmp_path / "data", steps=1)
                     + [f"--config.data.text_glob={corpus}/*.txt"])
    one_line_error(out, 2, "data.text_glob", "not UTF-8", "f")
    assert "model.context" not in last_line(out)
    assert "warning: skipped" in out.stderr
    record_fault("corpus of files that are not UTF-8", "named on stderr, then refused in one "
                 "line about the files (not model.context)", "passed")


def test_skipped_files_are_reported(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    src = os.path.join(os.path.dirname(json.__file__), "*.py")
    for path in glob.glob(src):
        (corpus / os.path.basename(path)).write_bytes(open(path, "rb").read())
    (corpus / "zz_binary.py").write_bytes(b"\xff\xfe" * 100)
    out = run_python(train_args(tmp_path / "run", tmp_path / "data", steps=1)
                     + [f"--config.data.text_glob={corpus}/*.py", "--config.data.val_fraction=0.3"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "zz_binary.py" in out.stderr
    manifest = json.loads(next((tmp_path / "data").rglob("manifest.json")).read_text())
    skipped = manifest["sources"]["text"]["skipped_files"]
    assert sum(s["count"] for s in skipped.values()) == 1, skipped
    record_fault("one non-UTF-8 file among text files",
                 "named on stderr and in the manifest; training goes on", "passed")

