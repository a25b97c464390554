"""Attention kernels: which one runs where, and the Pallas splash kernel (interpret mode
on this CPU) against the XLA path: outputs and gradients, dense and banded, lengths that
are not a multiple of the block, several windows, a 2 x 2 mesh and the whole model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python, tiny_config

from gpt_jax import attention, config, model


def value_and_grads(impl: str, q, k, v, window: int | None, block: int = 128):
    def f(q, k, v):
        y = attention.causal(q, k, v, window=window, kernel=attention.Kernel(impl, block, block))
        return jnp.sum(y * jnp.cos(y)), y  # a loss whose cotangent differs per element

    (_, y), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return y, grads


@pytest.mark.parametrize("t,window", [(200, None), (256, 64), (300, 100), (160, 200)])
def test_splash_matches_xla(t, window):
    # 200 and 300 are not multiples of the 128 block; 160 < window: the band is dense.
    q, k, v = (jax.random.normal(jax.random.key(i), (2, t, 2, 32)) for i in range(3))
    y_splash, g_splash = value_and_grads("splash", q, k, v, window)
    y_xla, g_xla = value_and_grads("xla", q, k, v, window)
    np.testing.assert_allclose(y_splash, y_xla, atol=2e-5)
    for name, a, b in zip("qkv", g_splash, g_xla):
        np.testing.assert_allclose(a, b, atol=5e-5, err_msg=f"d{name}")


def test_splash_kernel_serves_several_jits_of_one_shape():
    """The kernel is cached per shape; one first built inside a jit's trace held that
    trace's tracers, so the next jit of the shape (a train step, then an eval step) failed
    with UnexpectedTracerError."""
    q = jax.random.normal(jax.random.key(0), (1, 128, 2, 32))
    kernel = attention.Kernel("splash", 128, 128)
    f = lambda q: attention.causal(q, q, q, window=None, kernel=kernel)  # noqa: E731
    once = jax.jit(f)(q)
    np.testing.assert_array_equal(jax.jit(lambda q: f(q) * 2)(q), once * 2)
    assert jax.jit(jax.grad(lambda q: f(q).sum()))(q).shape == q.shape


def test_splash_blocks_pad_to_lanes():
    assert attention.splash_blocks(2048, 512, 512) == (512, 512, 2048)
    assert attention.splash_blocks(200, 512, 512) == (256, 256, 256)
    assert attention.splash_blocks(300, 128, 256) == (128, 256, 512)


@pytest.mark.parametrize("impl,platform,dtype,dropout,want", [
    ("auto", "tpu", jnp.bfloat16, False, "splash"),
    ("auto", "gpu", jnp.bfloat16, False, "cudnn"),
    ("auto", "gpu", jnp.float32, False, "xla"),  # cuDNN's flash kernel is 16-bit only
    ("auto", "cpu", jnp.float32, False, "xla"),
    ("splash", "cpu", jnp.float32, False, "splash"),  # interpret mode
    ("xla", "tpu", jnp.bfloat16, False, "xla"),
    ("cudnn", "gpu", jnp.float16, False, "cudnn")])
def test_choose(impl, platform, dtype, dropout, want):
    assert attention.choose(impl, platform=platform, dtype=dtype, head_dim=64,
                            dropout=dropout) == want


@pytest.mark.parametrize("impl,platform", [("auto", "tpu"), ("splash", "tpu"),
                                           ("cudnn", "gpu")])
def test_dropout_falls_back_to_xla_with_a_warning(impl, platform):
    with pytest.warns(RuntimeWarning, match="attention dropout.*XLA path"):
        assert attention.choose(impl, platform=platform, dtype=jnp.bfloat16, head_dim=64,
                                dropout=True) == "xla"


@pytest.mark.parametrize("impl,platform,dtype,head_dim,match", [
    ("splash", "gpu", jnp.bfloat16, 64, "TPU kernel"),
    ("cudnn", "cpu", jnp.bfloat16, 64, "needs an NVIDIA GPU"),
    ("cudnn", "gpu", jnp.float32, 64, "bfloat16 or float16"),
    ("cudnn", "gpu", jnp.bfloat16, 160, "multiple of 8 up to 128")])
def test_kernel_that_cannot_run_is_a_config_error(impl, platform, dtype, head_dim, match):
    with pytest.raises(config.ConfigError, match=f"model.attention_impl='{impl}'.*{match}"):
        attention.choose(impl, platform=platform, dtype=dtype, head_dim=head_dim, dropout=False)


def test_splash_without_a_mesh_on_several_chips_falls_back(monkeypatch):
    # XLA cannot partition a Pallas call: jits that bind no mesh get the XLA path
    monkeypatch.setattr(attention, "target_platform", lambda: "tpu")
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 16, 2, 8)) for i in range(3))
    with pytest.warns(RuntimeWarning, match="needs the mesh bound"):
        got = attention.causal(q, k, v, window=None, kernel=attention.Kernel("splash"))
    np.testing.assert_allclose(got, attention.dense_causal(q, k, v), atol=1e-6)


def test_block_sizes_are_validated():
    cfg = tiny_config(splash_block_q=200)
    with pytest.raises(config.ConfigError, match="model.splash_block_q=200"):
        config.validate(cfg)


def test_explicit_window_on_cpu_equals_banded():
    # the `local_window_size` argument (cuDNN's) on the explicit CPU form
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 13, 3, 8)) for i in range(3))
    got = attention.attend(q, k, v, None, is_causal=True, local_window_size=(3, 0))
    np.testing.assert_allclose(got, attention.banded_causal(q, k, v, window=4), atol=1e-5)


def test_model_with_splash_equals_xla():
    # Forward only (the gradients are checked op by op above): interpret mode is slow.
    kw = dict(attention_pattern="alternating", window=5, context=24)
    cfg, splash = tiny_config(**kw), tiny_config(attention_impl="splash", **kw)
    params = model.unbox(model.init_params(cfg.model, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.model.vocab_size)
    logits = [model.GPT(c.model).apply({"params": params}, tokens) for c in (cfg, splash)]
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4)


# Batch on `data` and heads on `model`: each of the 4 devices runs the kernel on its own
# shard (a shard_map derived from sharding.py's rules); gradients match XLA's.
MESH = """
import json, jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_num_cpu_devices", 4)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gpt_jax import attention, sharding
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
spec = NamedSharding(mesh, P("data", None, "model", None))
q, k, v = (jax.device_put(jax.random.normal(jax.random.key(i), (2, 200, 4, 32)), spec)
           for i in range(3))
out = {}
for window in (None, 64):
    res = {}
    for impl in ("splash", "xla"):
        def f(q, k, v):
            y = attention.causal(q, k, v, window=window, kernel=attention.Kernel(impl, 128, 128))
            return jnp.sum(y * jnp.cos(y)), y
        def step(q, k, v):
            with sharding.activation_sharding(mesh):
                return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        res[impl] = jax.jit(step)(q, k, v)
        if impl == "splash":
            hlo = jax.jit(step).lower(q, k, v).as_text()
    (_, y1), g1 = res["splash"]
    (_, y0), g0 = res["xla"]
    out[str(window)] = {"y": float(jnp.abs(y1 - y0).max()),
                        "grads": [float(jnp.abs(a - b).max()) for a, b in zip(g1, g0)],
                        "manual": hlo.count("manual_computation"),
                        "out_spec": str(y1.sharding.spec)}
print(json.dumps(out))
"""


def test_splash_under_a_2x2_mesh():
    out = run_python(["-c", MESH])
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    for window, row in r.items():
        assert row["y"] < 2e-5 and max(row["grads"]) < 5e-5, (window, row)
        assert row["manual"] >= 1, row  # the kernel ran inside a shard_map
        assert row["out_spec"] == "P('data', None, 'model', None)", row
