"""Schedules at their boundaries, the weight-decay mask and GPT-3's batch ramp."""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from gpt_jax import config, model, optim
from gpt_jax.config import base_config


def experiment(name: str, *args: str):
    spec = importlib.util.spec_from_file_location(name, f"{REPO}/experiments/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(*args)


def lr(cfg, step):
    return float(optim.learning_rate_schedule(cfg)(step))


def test_gpt1_schedule():
    cfg = experiment("gpt1")
    end = cfg.train.steps
    assert lr(cfg, 0) == 0.0
    assert lr(cfg, 1000) == pytest.approx(1.25e-4)
    assert lr(cfg, 2000) == pytest.approx(2.5e-4)
    mid = 2000 + (end - 2000) // 2
    assert lr(cfg, mid) == pytest.approx(1.25e-4, rel=1e-3)  # cosine halfway
    assert lr(cfg, end) == pytest.approx(0.0, abs=1e-12)
    assert lr(cfg, end + 100) == pytest.approx(0.0, abs=1e-12)


def test_gpt3_schedule_in_tokens_without_ramp():
    """With the ramp off a step is the full batch: the token boundaries fall where the old
    full-batch conversion put them."""
    cfg = experiment("gpt3", "small")
    cfg.optim.batch_ramp_tokens = 0
    per_step = cfg.train.batch_size * cfg.model.context  # 2**19 tokens
    assert per_step == 2**19
    warm = optim.warmup_steps(cfg)
    assert warm == int(np.ceil(375e6 / per_step))  # 716 steps
    decay = optim.decay_steps(cfg)
    assert decay == int(np.ceil(260e9 / per_step))
    peak = 6e-4
    assert lr(cfg, 0) == 0.0
    assert lr(cfg, 358) == pytest.approx(peak * 358 * per_step / 375e6, rel=1e-5)
    assert lr(cfg, warm - 1) < peak and lr(cfg, warm) == pytest.approx(peak)
    assert lr(cfg, decay) == pytest.approx(0.1 * peak)
    config.validate(cfg)  # train.tokens -> train.steps
    assert cfg.train.steps == int(np.ceil(300e9 / per_step))
    assert lr(cfg, cfg.train.steps) == pytest.approx(0.1 * peak)  # flat after 260B tokens


def ramp_reference(cfg, steps):
    """The ramp as specified, step by step: tokens grow linearly in steps from b0 to the
    full batch B over K = 2R / (b0 + B) steps, rounded to whole microbatches."""
    o, m = cfg.optim, cfg.train.microbatches
    full = cfg.train.batch_size * cfg.model.context
    k = 2 * o.batch_ramp_tokens / (o.batch_ramp_start_tokens + full)
    tokens = o.batch_ramp_start_tokens + (full - o.batch_ramp_start_tokens) * np.minimum(
        np.arange(steps) / k, 1.0)
    return np.clip(np.round(m * tokens / full), 1, m).astype(np.int64)


@pytest.mark.parametrize("size", ["small", "medium", "large", "xl", "2.7b", "6.7b", "13b",
                                  "175b"])
def test_gpt3_boundaries_in_real_tokens_with_the_ramp(size):
    """Warmup ends at 375M tokens actually consumed, decay at 260B, training at 300B
    (the full-batch conversion ended warmup at 31M / 15.6M / 6.55M tokens)."""
    cfg = config.validate(experiment("gpt3", size))
    micro = cfg.train.batch_size // cfg.train.microbatches * cfg.model.context
    ramp_steps = int(optim.ramp_starts(cfg)[-1]) + 2
    count = ramp_reference(cfg, ramp_steps)
    np.testing.assert_array_equal(optim.microbatches_at(cfg, np.arange(ramp_steps)), count)
    np.testing.assert_array_equal(optim.tokens_consumed(cfg, np.arange(1, ramp_steps + 1)),
                                  np.cumsum(count) * micro)
    consumed = functools.partial(optim.tokens_consumed, cfg)
    peak, floor = cfg.optim.peak_lr, 0.1 * cfg.optim.peak_lr
    for boundary, step in ((375e6, optim.warmup_steps(cfg)), (260e9, optim.decay_steps(cfg)),
                           (300e9, cfg.train.steps)):
        assert consumed(step - 1) < boundary <= consumed(step)
    warm = optim.warmup_steps(cfg)
    assert warm > 5 * int(np.ceil(375e6 / optim.tokens_per_step(cfg)))  # the ramp's small steps
    for s in (1, warm // 3, warm - 1):  # warmup is linear in tokens seen
        assert lr(cfg, s) == pytest.approx(peak * consumed(s) / 375e6, rel=1e-5)
    assert lr(cfg, warm) == pytest.approx(peak, rel=1e-6)
    decay = optim.decay_steps(cfg)
    mid = optim.steps_for_tokens(cfg, (375e6 + 260e9) / 2)  # the cosine's midpoint in tokens
    frac = (consumed(mid) - 375e6) / (260e9 - 375e6)
    assert lr(cfg, mid) == pytest.approx(
        floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * frac)), rel=1e-4)
    assert lr(cfg, decay - 200) > floor * 1.000001
    assert lr(cfg, decay) == pytest.approx(floor) and lr(cfg, cfg.train.steps) == lr(cfg, decay)
    # traced (in the optimizer) and eager (the logged lr) agree to XLA's rounding
    sched = optim.learning_rate_schedule(cfg)
    steps = jnp.array([0, 1, warm - 1, warm, mid, decay])
    np.testing.assert_allclose(jax.jit(jax.vmap(sched))(steps),
                               [float(sched(int(s))) for s in steps], rtol=1e-6)


def test_token_fields_must_be_non_negative():
    cfg = experiment("gpt3", "small")
    cfg.train.tokens = -1
    with pytest.raises(config.ConfigError, match=r"train.tokens=-1 must be a number of tokens"):
        config.validate(cfg)


def test_finetune_and_sft_schedules():
    cfg = base_config()
    cfg.train.steps = 1000
    cfg.optim.update(dict(schedule="linear", peak_lr=6.25e-5, warmup_frac=0.002,
                          final_lr_frac=0.0))
    assert optim.warmup_steps(cfg) == 2
    assert lr(cfg, 0) == 0.0 and lr(cfg, 2) == pytest.approx(6.25e-5)
    assert lr(cfg, 501) == pytest.approx(6.25e-5 / 2, rel=1e-3)
    assert lr(cfg, 1000) == pytest.approx(0.0, abs=1e-12)
    sft = base_config()
    sft.train.steps = 100
    sft.optim.update(dict(schedule="cosine", peak_lr=9.65e-6, final_lr_frac=0.1))
    assert lr(sft, 0) == pytest.approx(9.65e-6)  # no warmup
    assert lr(sft, 100) == pytest.approx(9.65e-7)


def test_decay_mask_and_clipping():
    cfg = base_config()
    cfg.model.update(dict(vocab_size=11, context=8, n_layer=2, n_head=2, d_model=8, d_ff=16,
                          scan_layers=True))
    params = model.unbox(model.init_params(cfg.model, jax.random.key(0)))
    mask = optim.decay_mask(params)
    assert mask["wte"]["embedding"] and mask["h"]["layer_0"]["mlp"]["fc"]["kernel"]
    assert not mask["h"]["layer_0"]["ln_1"]["scale"]  # stacked (layers, D) gain: no decay
    assert not mask["h"]["layer_0"]["attn"]["qkv"]["bias"]
    cfg.optim.update(dict(schedule="constant", peak_lr=0.1, weight_decay=0.5, grad_clip=1.0))
    tx = optim.make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # zero gradient: only decayed params move, by -lr * wd * w
    np.testing.assert_allclose(updates["wte"]["embedding"],
                               -0.1 * 0.5 * params["wte"]["embedding"], rtol=1e-5)
    assert float(jnp.abs(updates["h"]["layer_0"]["ln_1"]["scale"]).max()) == 0.0


def test_batch_ramp():
    cfg = experiment("gpt3", "small")
    m = cfg.train.microbatches
    assert m == 16 and cfg.train.batch_size // m * cfg.model.context == 32768
    assert int(optim.microbatches_at(cfg, 0)) == 1  # 32k tokens
    full = cfg.train.batch_size * cfg.model.context
    ramp_steps = 2 * 4e9 / (32768 + full)
    assert int(optim.microbatches_at(cfg, int(ramp_steps) + 1)) == m
    assert int(optim.microbatches_at(cfg, 10**7)) == m
    counts = [int(optim.microbatches_at(cfg, s)) for s in range(0, int(ramp_steps) + 2, 50)]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == m
    # tokens consumed by the ramp are about the configured 4B
    used = int(optim.microbatches_at(cfg, np.arange(int(ramp_steps))).sum())
    assert used * 32768 == pytest.approx(4e9, rel=0.02)
    cfg.optim.batch_ramp_tokens = 0
    assert int(optim.microbatches_at(cfg, 0)) == m


@pytest.mark.parametrize("scan", [False, True])
def test_muon_orthogonalises_hidden_matrices_and_leaves_the_rest_to_adamw(scan):
    cfg = base_config()
    cfg.model.update(dict(vocab_size=11, context=8, n_layer=2, n_head=2, d_model=8, d_ff=16,
                          scan_layers=scan))
    cfg.optim.update(dict(optimizer="muon", schedule="constant", peak_lr=0.1, muon_lr=0.05,
                          muon_momentum=0.0, weight_decay=0.0, grad_clip=0.0))
    config.validate(cfg)
    params = model.unbox(model.init_params(cfg.model, jax.random.key(0)))
    dims = optim.muon_dimensions(params)
    layer = (lambda t: t["h"]["layer_0"]) if scan else (lambda t: t["h_0"])
    assert dims["wte"]["embedding"] is None and dims["wpe"]["embedding"] is None
    assert layer(dims)["ln_1"]["scale"] is None and layer(dims)["mlp"]["fc"]["bias"] is None
    leaves = jax.tree.leaves(params)
    grads = jax.tree.unflatten(jax.tree.structure(params), [
        jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
    tx = optim.make_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)

    def singular_values(u, fan_in):  # of the update as (fan_in x fan_out) matrices
        m = np.asarray(u).reshape(-1, fan_in, u.size // fan_in // (u.shape[0] if scan else 1))
        return np.linalg.svd(m, compute_uv=False)

    def check_orthogonal(u, m, n):
        # scaled to RMS 0.2 * lr: singular values 0.2 * lr * sqrt(max(m, n)) * ~1 (Newton-
        # Schulz's quintic leaves them in roughly [0.7, 1.2], not exactly 1)
        s = singular_values(u, m) / (0.2 * 0.05 * np.sqrt(max(m, n)))
        assert s.min() > 0.5 and s.max() < 1.3, s

    u = layer(updates)
    check_orthogonal(u["mlp"]["fc"]["kernel"], 8, 16)
    check_orthogonal(u["mlp"]["proj"]["kernel"], 16, 8)
    check_orthogonal(u["attn"]["proj"]["kernel"], 8, 8)  # H x K x D as one (H*K) x D
    qkv = np.asarray(u["attn"]["qkv"]["kernel"])  # [L x] D x 3 x H x K: q, k, v apart
    for i in range(3):
        check_orthogonal(qkv[..., i, :, :], 8, 8)
    # AdamW's first step is lr * g / |g| elementwise; no weight decay here
    np.testing.assert_allclose(updates["wte"]["embedding"],
                               -0.1 * np.sign(grads["wte"]["embedding"]), rtol=1e-4)
