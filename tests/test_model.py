"""The decoder: causality, banded == masked dense, scan == loop, dropout, precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from gpt_jax import attention, model


def logits_of(cfg, params, tokens, **kw):
    return model.GPT(cfg.model).apply({"params": params}, tokens, **kw)


def init(cfg, seed=0):
    return model.unbox(model.init_params(cfg.model, jax.random.key(seed)))


def tokens(cfg, batch=2, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, cfg.model.context), 0,
                              cfg.model.vocab_size)


@pytest.mark.parametrize("norm,pattern", [("pre", "dense"), ("post", "dense"),
                                          ("pre", "alternating")])
def test_causal(norm, pattern):
    cfg = tiny_config(norm=norm, attention_pattern=pattern, window=4)
    params, x = init(cfg), tokens(cfg)
    t = 7
    y = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % cfg.model.vocab_size)
    a, b = logits_of(cfg, params, x), logits_of(cfg, params, y)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("t,window", [(16, 4), (13, 4), (9, 3), (8, 8), (5, 8)])
def test_banded_equals_masked_dense(t, window):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, t, 3, 8)) for i in range(3))
    pos = jnp.arange(t)
    mask = attention.band_mask(pos, pos, window)[None]
    dense = attention.attend(q, k, v, jnp.broadcast_to(mask, (2, t, t)))
    banded = attention.banded_causal(q, k, v, window=window)
    np.testing.assert_allclose(banded, dense, atol=1e-5)


def test_banded_layer_only_sees_its_window():
    q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
    changed = q.at[:, :10].set(0.0)
    out = attention.banded_causal(q, q, q, window=3)
    out2 = attention.banded_causal(changed, changed, changed, window=3)
    # positions >= 12 only look at positions >= 10, which did not change
    np.testing.assert_allclose(out[:, 12:], out2[:, 12:], atol=1e-6)
    assert not np.allclose(out[:, 10:12], out2[:, 10:12])


@pytest.mark.parametrize("pattern", ["dense", "alternating"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_loop(pattern, remat):
    cfg = tiny_config(n_layer=4, attention_pattern=pattern, window=4, remat=remat)
    params, x = init(cfg), tokens(cfg)
    scanned = cfg.copy_and_resolve_references()
    scanned.model.scan_layers = True
    stacked = model.stack_layers(params, cfg.model)
    np.testing.assert_allclose(logits_of(cfg, params, x), logits_of(scanned, stacked, x),
                               atol=1e-5)
    # the scanned init has exactly the stacked layout
    fresh = init(scanned)
    assert jax.tree.structure(fresh) == jax.tree.structure(stacked)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)
    back = model.unstack_layers(stacked, cfg.model)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), back, params))


def test_remat_same_gradients():
    cfg = tiny_config()
    params, x = init(cfg), tokens(cfg)
    remat = cfg.copy_and_resolve_references()
    remat.model.remat = "dots_saveable"

    def loss(c, p):
        return jnp.mean(logits_of(c, p, x) ** 2)

    g0, g1 = jax.grad(loss, 1)(cfg, params), jax.grad(loss, 1)(remat, params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_dropout():
    cfg = tiny_config(embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
    params, x = init(cfg), tokens(cfg)
    np.testing.assert_array_equal(logits_of(cfg, params, x), logits_of(cfg, params, x))
    train = [logits_of(cfg, params, x, deterministic=False, rngs={"dropout": jax.random.key(s)})
             for s in (0, 0, 1)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2])
    assert not np.allclose(train[0], logits_of(cfg, params, x))


def test_structure_and_init():
    cfg = tiny_config(n_layer=3)
    boxed = model.init_params(cfg.model, jax.random.key(0))
    specs = model.logical_axes(boxed)
    for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda s: s is not None and
                                          type(s).__name__ == "PartitionSpec"),
                          jax.tree.leaves(model.unbox(boxed))):
        assert len(spec) == leaf.ndim  # every param carries logical names
    p = model.unbox(boxed)
    assert "ln_f" in p and "ln_f" not in init(tiny_config(norm="post"))
    assert p["wte"]["embedding"].dtype == jnp.float32
    std = cfg.model.init_std
    assert abs(float(jnp.std(p["h_0"]["mlp"]["fc"]["kernel"])) - std) < 0.2 * std
    resid = float(jnp.std(p["h_0"]["mlp"]["proj"]["kernel"]))
    assert abs(resid - std / np.sqrt(2 * 3)) < 0.2 * std / np.sqrt(6)
    assert float(jnp.abs(p["h_0"]["attn"]["qkv"]["bias"]).max()) == 0.0


def test_bfloat16_compute_float32_logits():
    cfg = tiny_config(dtype="bfloat16")
    params, x = init(cfg), tokens(cfg)
    out = logits_of(cfg, params, x)
    assert out.dtype == jnp.float32
    ref = logits_of(tiny_config(), params, x)
    np.testing.assert_allclose(out, ref, atol=0.1)


def test_positions_and_hidden():
    cfg = tiny_config()
    params, x = init(cfg), tokens(cfg)
    h = model.GPT(cfg.model).apply({"params": params}, x, return_hidden=True)
    assert h.shape == (2, cfg.model.context, cfg.model.d_model)
    shifted = model.GPT(cfg.model).apply({"params": params}, x[:, :8],
                                         positions_BxT=jnp.arange(8)[None])
    np.testing.assert_allclose(shifted, logits_of(cfg, params, x)[:, :8], atol=1e-5)
