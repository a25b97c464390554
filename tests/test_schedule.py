"""`python -m gpt_jax.schedule`, and the loop's real token counts and step-0 evaluation
with GPT-3's batch ramp on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_python, tiny_config
from test_optim import experiment

from gpt_jax import loop, metrics, optim, schedule, sharding, steps
from gpt_jax.config import validate


def ramp_config():
    """8 sequences of 16 tokens in 4 microbatches; the ramp starts at one microbatch and
    lasts 2 * 200 / (32 + 128) = 2.5 steps; warmup over 100 tokens, training 448."""
    cfg = tiny_config(n_layer=1)
    cfg.train.update(dict(batch_size=8, microbatches=4, tokens=448, log_every=1, eval_every=3,
                          ckpt_every=100))
    cfg.optim.update(dict(batch_ramp_tokens=200, batch_ramp_start_tokens=32,
                          warmup_tokens=100, decay_tokens=400, peak_lr=1e-3))
    return cfg


def test_ramp_by_hand():
    cfg = ramp_config()
    # counts 1, 2.2 -> 2, 3.4 -> 3, then 4 (steps >= 2.5 are full)
    assert np.asarray(optim.microbatches_at(cfg, np.arange(5))).tolist() == [1, 2, 3, 4, 4]
    assert [optim.tokens_consumed(cfg, s) for s in range(5)] == [0, 32, 96, 192, 320]
    assert [optim.steps_for_tokens(cfg, t) for t in (0, 1, 32, 33, 100, 448, 449)] == \
        [0, 1, 1, 2, 3, 5, 6]
    lr = optim.learning_rate_schedule(cfg)
    np.testing.assert_allclose([float(lr(s)) for s in range(3)], [0, 0.32e-3, 0.96e-3],
                               rtol=1e-6)
    assert float(lr(3)) < 1e-3  # 192 tokens: past the warmup, decaying


def test_loop_logs_real_tokens_and_evaluates_at_step_0(tmp_path):
    cfg = validate(ramp_config())
    assert cfg.train.steps == 5  # 320 tokens after 4 steps, 448 after 5
    mesh = sharding.make_mesh(cfg)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.model.vocab_size, (5, 4, 2, cfg.model.context + 1))
    evals = []

    def evaluate(params):
        evals.append(len(evals))
        return {"eval_loss": float(len(evals))}

    task = loop.Task(loss_fn=steps.lm_loss_fn(cfg.model),
                     batch=lambda step: windows[step].astype(np.int32), evaluate=evaluate,
                     tokens_per_step=cfg.train.batch_size * cfg.model.context)
    final, _, preempted = loop.run(cfg, str(tmp_path), mesh, task)
    assert not preempted and np.isfinite(final["loss"])
    rows = metrics.read_metrics(str(tmp_path))
    train = [r for r in rows if "loss" in r]
    assert [(r["step"], r["tokens"]) for r in train] == [
        (1, 32), (2, 96), (3, 192), (4, 320), (5, 448)]
    np.testing.assert_allclose([r["lr"] for r in train],
                               [float(optim.learning_rate_schedule(cfg)(s)) for s in range(5)])
    assert [(r["step"], r["tokens"]) for r in rows if "eval_loss" in r] == [
        (0, 0), (3, 192), (5, 448)]


def test_parse_tokens():
    assert schedule.parse_tokens(["375e6", "4B", "1.5m", "0", "12k"]) == [
        375e6, 4e9, 1.5e6, 0.0, 12e3]
    for bad in ("-1", "x", "nan", "4Q", ""):
        with pytest.raises(ValueError, match="--tokens"):
            schedule.parse_tokens([bad])


def test_report_and_plot(tmp_path):
    cfg = ramp_config()
    text, rows, marks = schedule.report(cfg, schedule.default_marks(cfg), points=2)
    assert marks == {"warmup": 3, "batch ramp": 4, "decay": 5, "training": 5}
    assert rows["step"].tolist() == [0, 2, 3, 4, 5]
    assert rows["tokens"].tolist() == [0, 96, 192, 320, 448]
    assert rows["batch_seqs"].tolist() == [2, 6, 8, 8, 8]
    assert "<- warmup" in text and "5 steps, 448 tokens" in text
    schedule.plot(cfg, marks, str(tmp_path / "s.png"), samples=10)
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_cli(tmp_path):
    out = tmp_path / "s.png"
    res = run_python(["-m", "gpt_jax.schedule", "--config=experiments/gpt3.py:xl",
                      "--tokens=375e6,260B", "--points=0", f"--out={out}"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = validate(experiment("gpt3", "xl"))
    for tokens in (375e6, 260e9):  # the steps printed are optim's (as training uses)
        step = optim.steps_for_tokens(cfg, tokens)
        assert f"  {tokens:,.0f} tokens: step {step:,}, " in res.stdout
    assert out.exists()
    bad = run_python(["-m", "gpt_jax.schedule", "--config=experiments/gpt3.py:xl",
                      "--tokens=375e6,-5"], timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == \
        "--tokens: '-5' is not a number of tokens >= 0 (e.g. 375e6 or 4B)"
