"""The training loop: exact resume after SIGKILL, SIGTERM checkpoints, guards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import pytest
from conftest import REPO, run_python

from gpt_jax import checkpoint, metrics, model
from gpt_jax.workdir import Workdir

CORPUS = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")


def train_args(workdir, data_dir, steps=20, **overrides):
    args = ["-m", "gpt_jax.train", "--config=experiments/tiny.py:char", f"--workdir={workdir}",
            f"--config.train.steps={steps}", "--config.data.source=text",
            f"--config.data.text_glob={CORPUS}", f"--config.data.data_dir={data_dir}",
            "--config.model.context=32", "--config.model.n_layer=2", "--config.model.d_model=32",
            "--config.model.n_head=2", "--config.model.d_ff=64", "--config.train.batch_size=4",
            "--config.train.log_every=1", "--config.train.eval_every=10",
            "--config.train.eval_batches=2", "--config.train.ckpt_every=10",
            "--config.train.sample_tokens=8", "--config.model.resid_pdrop=0.1"]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def final_params(workdir):
    cfg = Workdir(workdir).read_config()
    shapes = model.unbox(model.abstract_params(cfg.model))
    params, meta = checkpoint.restore_params(workdir, shapes)
    return meta["step"], jax.tree.leaves(params)


def kill_script(at_step: int, after_checkpoint: int) -> str:
    """`python -c` text of `gpt_jax.train` that SIGKILLs itself before step `at_step + 1`,
    once the (asynchronous) `after_checkpoint` checkpoint is complete: orbax writes
    commit_success.txt last, locally and on Cloud Storage (where nothing is renamed)."""
    return f"""
import os, signal, sys, time
from etils import epath
from gpt_jax import cli, loop, train
build = loop.build_trainer
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
def build_and_kill(*args, **kwargs):
    trainer = build(*args, **kwargs)
    step_fn = trainer.train_step
    def step(state, *rest):
        if int(state["step"]) == {at_step}:
            done = epath.Path(workdir) / "checkpoints" / "{after_checkpoint}" / "commit_success.txt"
            deadline = time.time() + 120
            while not done.exists():
                assert time.time() < deadline, "checkpoint {after_checkpoint} never completed"
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return step_fn(state, *rest)
    trainer.train_step = step
    return trainer
loop.build_trainer = build_and_kill
cli.define_run_flags()
cli.run(train.main)
"""


KILL_AT_13 = kill_script(13, 10)  # SIGKILL at step 13, once checkpoint 10 is complete


def test_kill_and_resume_is_exact(tmp_path):
    data = tmp_path / "data"
    straight = run_python(train_args(tmp_path / "straight", data))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "--- sample (temperature 0.6, top-p 0.9, repetition penalty 1.3, seed 0) ---" \
        in straight.stdout

    killed = run_python(["-c", KILL_AT_13] + train_args(tmp_path / "resumed", data)[2:])
    assert killed.returncode == -signal.SIGKILL
    resumed = run_python(train_args(tmp_path / "resumed", data))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 10" in resumed.stdout

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])
    step_a, params_a = final_params(tmp_path / "straight")
    step_b, params_b = final_params(tmp_path / "resumed")
    assert step_a == step_b == 20
    for x, y in zip(params_a, params_b):
        np.testing.assert_array_equal(x, y)
    # the workdir holds what sampling and plotting need
    names = set(os.listdir(tmp_path / "straight"))
    assert {"config.json", "metrics.jsonl", "checkpoints", "tb"} <= names
    rows = metrics.read_metrics(tmp_path / "straight")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20] and evals[0]["eval_bpb"] > 0  # 0: init
    train_row = next(r for r in rows if "loss" in r)
    assert {"tokens", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(train_row)


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    workdir, data = tmp_path / "run", tmp_path / "data"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable] + train_args(workdir, data, steps=100000,
                                                          **{"train.ckpt_every": 100000}),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        path = workdir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 5:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert len(steps) == 1 and steps[0] >= 5
    assert "sample" not in out  # a preempted run exits promptly


def test_nonfinite_loss_stops_with_step(tmp_path):
    out = run_python(train_args(tmp_path / "run", tmp_path / "data", steps=30,
                                **{"optim.peak_lr": 1e12, "optim.grad_clip": 0.0,
                                   "optim.warmup_steps": 0}))
    assert out.returncode != 0
    assert "loss became nan at step" in out.stderr or "loss became inf at step" in out.stderr


def test_context_longer_than_corpus_fails_before_compiling(tmp_path):
    for i in range(6):
        (tmp_path / f"small{i}.txt").write_text("tiny corpus " * 10)
    out = run_python(train_args(tmp_path / "run", tmp_path / "data", steps=2,
                                **{"data.text_glob": str(tmp_path / "small*.txt"),
                                   "data.val_fraction": 0.5,
                                   "model.context": 512}))
    assert out.returncode != 0
    assert "model.context=512" in out.stderr


def test_relative_workdir_and_resolved_config(tmp_path):
    args = train_args("run", "data", steps=2, **{"train.eval_every": 2, "train.ckpt_every": 2,
                                                 "mesh.cpu_devices": 2})
    args[2] = f"--config={REPO}/experiments/tiny.py:char"
    out = run_python(args, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh data=2 x model=1 of 2 cpu devices" in out.stdout  # the cores, data-parallel
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["steps"] == 2 and saved["model"]["context"] == 32


@pytest.mark.parametrize("bad,message", [
    ("model.n_head=5", "model.d_model=32 is not divisible by model.n_head=5"),
    ("mesh.cpu_devices=0", "mesh.cpu_devices=0 must be >= 1")])
def test_bad_config_fails_fast(tmp_path, bad, message):
    field, value = bad.split("=")
    out = run_python(train_args(tmp_path / "run", tmp_path / "data", **{field: value}))
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("stride", [0, 16, 5, 1])
def test_full_split_loss_scores_every_target_once(stride):
    """Overlapping windows (`train.full_eval_overlap`) score each validation target exactly
    once, whatever the batch padding; a real model's loss is the same for any batch size,
    and with the whole context behind every late token it is lower than without overlap."""
    from gpt_jax import sharding, steps, train
    from gpt_jax.config import base_config

    cfg = base_config()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    tokens = np.random.default_rng(0).integers(1, 50, 203).astype(np.int32)
    context = 16

    def ids_scored(params, windows_BxT1, mask_BxT):  # "loss" = sum of target ids scored
        return (windows_BxT1[:, 1:] * mask_BxT).sum(), mask_BxT.sum()

    total, count = train.full_split_loss(ids_scored, None, tokens, batch=3, context=context,
                                         mesh=mesh, stride=stride)
    s = stride or context
    scored = context + (len(tokens) - 1 - context) // s * s  # targets 1..scored
    assert count == scored and len(tokens) - 1 - scored < s
    assert total == tokens[1:scored + 1].sum()

    cfg.model.update(vocab_size=64, context=context, n_layer=1, n_head=2, d_model=16, d_ff=32)
    params = model.init_params(cfg.model, jax.random.key(0))
    step = steps.jit_eval_step(cfg.model, mesh)
    with sharding.activation_sharding(mesh):
        a = train.full_split_loss(step, params, tokens, batch=3, context=context, mesh=mesh,
                                  stride=stride)
        b = train.full_split_loss(step, params, tokens, batch=8, context=context, mesh=mesh,
                                  stride=stride)
    assert a[1] == b[1] == scored
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)


def test_eval_tasks_are_scored_in_the_loop_as_evaluate_scores_them(tmp_path):
    from test_hellaswag import GRILL, ROOF, TENNIS, write_jsonl
    write_jsonl(tmp_path / "hellaswag_val.jsonl", [ROOF, GRILL, TENNIS])
    (tmp_path / "hellaswag.json").write_text(json.dumps(
        {"name": "hellaswag", "type": "multiple_choice", "eval": "hellaswag_val.jsonl",
         "adapter": "hellaswag"}))
    tasks = f"{tmp_path / 'hellaswag.json'},{REPO}/experiments/eval/toy_mc.json"
    workdir = tmp_path / "run"
    out = run_python(train_args(workdir, tmp_path / "data", steps=10,
                                **{"train.eval_tasks": tasks, "train.eval_task_limit": 2,
                                   "train.sample_tokens": 0}))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in metrics.read_metrics(workdir) if "eval_loss" in r]
    assert [r["step"] for r in rows] == [0, 10]
    names = ("hellaswag/llmc_acc", "hellaswag/llmc_acc_norm", "hellaswag/lmeval_acc",
             "hellaswag/lmeval_acc_norm", "toy_mc/acc", "toy_mc/acc_per_byte")
    for r in rows:  # at initialisation and after training, 2 examples each: 0, 0.5 or 1
        assert all(r[n] in (0.0, 0.5, 1.0) for n in names), r
    report = tmp_path / "report.json"  # the same numbers from the command, same examples
    out = run_python(["-m", "gpt_jax.evaluate", f"--workdir={workdir}", f"--tasks={tasks}",
                      "--limit=2", f"--out={report}"])
    assert out.returncode == 0, out.stderr[-3000:]
    for r in json.loads(report.read_text())["results"]:
        for k, v in r["metrics"].items():
            if isinstance(v, float):
                assert rows[-1][f"{r['task']}/{k}"] == pytest.approx(v, abs=1e-9), k
    bad = run_python(train_args(tmp_path / "bad", tmp_path / "data", steps=2,
                                **{"train.eval_tasks": str(tmp_path / "nope.json")}))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: train.eval_tasks: "), \
        bad.stderr[-2000:]
    assert not (tmp_path / "bad" / "checkpoints").exists()
