"""Causal self-attention kernels: dense, and GPT-3's locally banded layers.

All functions take per-head tensors `q_BxTxHxD`, `k_BxSxHxD`, `v_BxSxHxD` in the
compute dtype and return `BxTxHxD`. Scores and softmax are computed in float32.

Banded attention (Sparse Transformer "local" pattern, used by GPT-3's odd
layers): query i sees key j iff 0 <= i - j < window. On the XLA path it is
computed blockwise with blocks of `window` queries, each attending only to its
own block and the one before, so cost and memory are O(T * window) instead of
O(T^2); the kernels take the band as a mask and skip the blocks outside it.

Which kernel runs (`model.attention_impl`, resolved by `choose` at trace time):
- `xla`: `jax.nn.dot_product_attention(implementation='xla')`, which materialises
  the T x T scores of every head (on CPU the explicit einsum form below);
- `splash`: Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention,
  the flash-attention kernel MaxText uses on TPU) with `CausalMask` for dense layers
  and `LocalMask` for banded ones; batch and heads sharded over the mesh by
  `shard_map`, as `sharding.py`'s rules place them; Pallas interpret mode on CPU
  (tests only: correct, not fast);
- `cudnn`: cuDNN's fused flash attention on NVIDIA GPUs, banded layers through
  `local_window_size`;
- `auto` (default): splash on TPU, cuDNN on GPU where its shapes are supported
  (bfloat16/float16, head_dim a multiple of 8 up to 128), XLA elsewhere.
The kernels have no attention dropout: while it is on (GPT-1/2 training with
`attn_pdrop` > 0) the XLA path runs, and a one-line warning says so.

KV-cache decoding (`dense_decode`, `banded_decode`): T new tokens at once (the
whole left-padded prompt, then one token per step) go to cache slots
`index .. index+T-1`, the same slots for every row; row b's real tokens start at
slot `pad_B[b]` and earlier (padding) slots are never attended. Dense layers keep
every slot; banded layers keep only the last `window` keys in a ring buffer
(slot s lives at s % window). Decoding always takes the XLA path.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from gpt_jax import precision, sharding
from gpt_jax.config import ConfigError

Array = jax.Array
IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
SPLASH_LANES = 128  # splash block sizes are multiples of the TPU's 128 lanes


class Kernel(NamedTuple):
    """What `model.attention_impl` and the splash block sizes ask for."""

    implementation: str = "auto"
    block_q: int = 512
    block_kv: int = 512

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict) -> Kernel:
        # configs saved before these fields existed get the defaults
        return cls(model_cfg.get("attention_impl", "auto"),
                   model_cfg.get("splash_block_q", cls.block_q),
                   model_cfg.get("splash_block_kv", cls.block_kv))


XLA = Kernel("xla")  # the default of direct calls (tests, benchmarks)


def target_platform() -> str:
    """The platform this trace compiles for: that of the mesh bound by
    `sharding.activation_sharding` (a compile-only TPU slice when `gpt_jax.compile`
    runs on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def cudnn_supported(dtype: jnp.dtype, head_dim: int) -> bool:
    """Shapes cuDNN's flash attention takes (jax.nn.dot_product_attention's checks)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 128)


def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # once per call site (Python default)


def choose(implementation: str, *, platform: str, dtype: jnp.dtype, head_dim: int,
           dropout: bool) -> str:
    """The kernel that runs ('xla', 'splash' or 'cudnn') for `model.attention_impl` on
    `platform`. A kernel that cannot run there is a ConfigError; attention dropout, which
    the kernels lack, falls back to XLA with a warning."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention_impl={implementation!r} is not one of "
                          f"{list(IMPLEMENTATIONS)}")
    if implementation == "splash" and platform not in ("tpu", "cpu"):
        raise ConfigError(f"model.attention_impl='splash' is a TPU kernel (Pallas interpret "
                          f"mode on CPU for tests), not for {platform}; use 'auto'")
    if implementation == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU, not {platform}; "
                          f"use 'auto'")
    if implementation == "cudnn" and not cudnn_supported(dtype, head_dim):
        raise ConfigError(f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16 "
                          f"and a head size (d_model / n_head) that is a multiple of 8 up to "
                          f"128, not {jnp.dtype(dtype).name} and {head_dim}")
    if implementation == "auto":
        if platform == "tpu":
            implementation = "splash"
        elif platform == "gpu" and cudnn_supported(dtype, head_dim):
            implementation = "cudnn"
        else:
            return "xla"
    if implementation != "xla" and dropout:
        _warn_once(f"attention dropout (model.attn_pdrop > 0) is not in the {implementation} "
                   f"kernel: training attention runs on the XLA path")
        return "xla"
    return implementation


def attend(q_BxTxHxD: Array, k_BxSxHxD: Array, v_BxSxHxD: Array, mask_BxTxS: Array | None,
           *, is_causal: bool = False, dropout_rate: float = 0.0,
           dropout_rng: Array | None = None, implementation: str = "xla",
           local_window_size: tuple[int, int] | None = None) -> Array:
    """Softmax attention with an optional boolean mask (True = may attend), on the XLA
    path or (`implementation='cudnn'`) cuDNN's fused kernel.

    Without dropout on accelerators this is `jax.nn.dot_product_attention`. With
    dropout (training GPT-1/2 style), and on CPU, where XLA has no fused kernel and the
    explicit form below measured ~8% faster for the tiny config's train step, the
    probabilities are materialised.
    """
    mask = None if mask_BxTxS is None else mask_BxTxS[:, None, :, :]  # B x 1 x T x S
    no_dropout = dropout_rate == 0.0 or dropout_rng is None
    if implementation == "cudnn" or (no_dropout and target_platform() != "cpu"):
        return jax.nn.dot_product_attention(
            q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, mask=mask, is_causal=is_causal,
            implementation=implementation, local_window_size=local_window_size)
    if local_window_size is not None:
        t, s = q_BxTxHxD.shape[1], k_BxSxHxD.shape[1]
        band = band_mask(jnp.arange(t) + s - t, jnp.arange(s), local_window_size[0] + 1)
        mask = band[None, None] if mask is None else mask & band
    depth = q_BxTxHxD.shape[-1]
    logits_BxHxTxS = precision.einsum_f32("bthd,bshd->bhts", q_BxTxHxD,
                                          k_BxSxHxD) / jnp.sqrt(depth)
    if is_causal:
        t, s = logits_BxHxTxS.shape[-2:]
        causal = jnp.tril(jnp.ones((t, s), bool), k=s - t)
        mask = causal[None, None] if mask is None else mask & causal
    if mask is not None:
        logits_BxHxTxS = jnp.where(mask, logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    if no_dropout:
        return jnp.einsum("bhts,bshd->bthd", probs.astype(v_BxSxHxD.dtype), v_BxSxHxD)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v_BxSxHxD.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v_BxSxHxD)


def dense_causal(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, *,
                 kernel: Kernel | None = None, dropout_rate: float = 0.0,
                 dropout_rng: Array | None = None) -> Array:
    """Every position attends to itself and all earlier positions."""
    return causal(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, window=None, kernel=kernel or XLA,
                  dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def banded_causal(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, *, window: int,
                  kernel: Kernel | None = None, dropout_rate: float = 0.0,
                  dropout_rng: Array | None = None) -> Array:
    """Locally banded causal attention: query i sees keys i - window + 1 .. i."""
    return causal(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, window=window, kernel=kernel or XLA,
                  dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def causal(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, *, window: int | None,
           kernel: Kernel, dropout_rate: float = 0.0, dropout_rng: Array | None = None
           ) -> Array:
    """Causal self-attention (banded if `window`) on the kernel `choose` picks."""
    dropout = dropout_rate > 0.0 and dropout_rng is not None
    platform = target_platform()
    impl = choose(kernel.implementation, platform=platform, dtype=q_BxTxHxD.dtype,
                  head_dim=q_BxTxHxD.shape[-1], dropout=dropout)
    if (impl == "splash" and platform == "tpu" and jax.sharding.get_abstract_mesh().empty
            and jax.device_count() > 1):  # XLA cannot partition a Pallas call by itself
        _warn_once("splash attention on several TPU chips needs the mesh bound "
                   "(sharding.activation_sharding) around the jitted call: this one runs "
                   "the XLA path")
        impl = "xla"
    t = q_BxTxHxD.shape[1]
    band = window is not None and t > window  # else the band covers every causal pair
    if impl == "splash":
        return splash_causal(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, window=window if band else None,
                             block_q=kernel.block_q, block_kv=kernel.block_kv)
    kw = dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng, implementation=impl)
    if impl == "cudnn":
        return attend(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, None, is_causal=True,
                      local_window_size=(window - 1, 0) if band else None, **kw)
    if not band:
        return attend(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, None, is_causal=True, **kw)
    return _blockwise_banded(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, window, **kw)


def band_mask(q_pos: Array, k_pos: Array, window: int) -> Array:
    """True where key position may be seen by query position: 0 <= q - k < window."""
    delta = q_pos[..., :, None] - k_pos[..., None, :]
    return (delta >= 0) & (delta < window)


def _blockwise_banded(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, window: int,
                      **kw) -> Array:
    """The XLA path of banded attention, in blocks of `window` queries: O(T * window)."""
    b, t, h, d = q_BxTxHxD.shape
    c = window
    n = -(-t // c)  # number of query blocks
    pad = n * c - t

    def blocks(x_BxTxHxD: Array) -> Array:
        x = jnp.pad(x_BxTxHxD, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b, n, c, h, d)

    q_BxNxCxHxD, k_BxNxCxHxD, v_BxNxCxHxD = blocks(q_BxTxHxD), blocks(k_BxTxHxD), blocks(v_BxTxHxD)

    def with_previous(x_BxNxCxHxD: Array) -> Array:  # keys of block n-1 then block n
        prev = jnp.pad(x_BxNxCxHxD, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
        return jnp.concatenate([prev, x_BxNxCxHxD], axis=2)  # B x N x 2C x H x D

    k_BxNx2CxHxD, v_BxNx2CxHxD = with_previous(k_BxNxCxHxD), with_previous(v_BxNxCxHxD)
    q_pos_NxC = jnp.arange(n * c).reshape(n, c)
    k_pos_Nx2C = jnp.concatenate([q_pos_NxC - c, q_pos_NxC], axis=1)
    mask_NxCx2C = band_mask(q_pos_NxC, k_pos_Nx2C, window) & (k_pos_Nx2C >= 0)[:, None, :]
    mask = jnp.broadcast_to(mask_NxCx2C[None], (b, n, c, 2 * c)).reshape(b * n, c, 2 * c)
    out = attend(q_BxNxCxHxD.reshape(b * n, c, h, d), k_BxNx2CxHxD.reshape(b * n, 2 * c, h, d),
                 v_BxNx2CxHxD.reshape(b * n, 2 * c, h, d), mask, **kw)
    return out.reshape(b, n * c, h, d)[:, :t]


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, window: int | None, block_q: int, block_kv: int,
                   interpret: bool):
    """The splash MHA kernel for `heads` heads of `length` tokens: CausalMask, or GPT-3's
    band as LocalMask((W - 1, 0)) (query i sees keys i-W+1 .. i). Its mask tables are
    built in numpy once per shape."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    shape = (length, length)
    mask = sa.CausalMask(shape) if window is None else sa.LocalMask(
        shape, window_size=(window - 1, 0), offset=0)
    blocks = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                           block_q_dkv=block_q, block_kv_dkv=block_kv,
                           block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                           block_kv_dq=block_kv)
    # Built eagerly even when first asked for inside a trace: the kernel keeps its mask
    # tables as arrays, and arrays made under one jit's trace would be that trace's
    # tracers, which the next jit of the same shape (train step, then eval step) cannot use.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_blocks(length: int, block_q: int, block_kv: int) -> tuple[int, int, int]:
    """(block_q, block_kv, padded length) for a sequence of `length`: blocks no longer
    than the sequence rounded up to the 128 lanes, the sequence padded to both blocks."""
    lanes = -(-length // SPLASH_LANES) * SPLASH_LANES
    bq, bkv = min(block_q, lanes), min(block_kv, lanes)
    return bq, bkv, -(-length // math.lcm(bq, bkv)) * math.lcm(bq, bkv)


def splash_causal(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, *,
                  window: int | None, block_q: int = 512, block_kv: int = 512) -> Array:
    """Causal (banded if `window`) attention by the Pallas splash kernel.

    The kernel takes one sequence, heads first, unscaled: q is pre-scaled by
    1/sqrt(head_dim), batch vmapped. T is padded at the end to the block sizes; causal
    and band masks keep real queries off the padded keys, and the padded queries' rows
    are dropped. Under a mesh (`sharding.activation_sharding`) the call is a `shard_map`
    over batch and heads, as `sharding.py`'s rules place them; each device runs its own
    heads. On CPU the kernel runs in Pallas interpret mode.
    """
    b, t, h, d = q_BxTxHxD.shape
    bq, bkv, length = splash_blocks(t, block_q, block_kv)
    interpret = target_platform() == "cpu"
    scale = 1.0 / math.sqrt(d)

    def local(q_bxTxhxD: Array, k_bxTxhxD: Array, v_bxTxhxD: Array) -> Array:
        kernel = _splash_kernel(q_bxTxhxD.shape[2], length, window, bq, bkv, interpret)

        def heads_first(x_bxTxhxD: Array) -> Array:
            x = jnp.pad(x_bxTxhxD, ((0, 0), (0, length - t), (0, 0), (0, 0)))
            return x.transpose(0, 2, 1, 3)  # b x h x T x D

        q = heads_first((q_bxTxhxD.astype(jnp.float32) * scale).astype(q_bxTxhxD.dtype))
        # the scope names the mask in the HLO, where hlo_cost.splash_flops reads it
        with jax.named_scope("splash_causal" if window is None else f"splash_band{window}"):
            out_bxhxTxD = jax.vmap(kernel)(q, heads_first(k_bxTxhxD), heads_first(v_bxTxhxD))
        return out_bxhxTxD.transpose(0, 2, 1, 3)[:, :t].astype(q_bxTxhxD.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD)
    spec = _batch_heads_spec(mesh, b, h)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD)


def _batch_heads_spec(mesh: jax.sharding.AbstractMesh, batch: int, heads: int
                      ) -> PartitionSpec:
    """B x T x H x D placed by sharding.py's rules for `batch` and `heads` (which do not
    depend on the config); a mesh axis that is absent or does not divide stays whole."""
    table = dict(sharding.rules(ml_collections.ConfigDict({"mesh": {"fsdp": False}})))

    def axis(name: str, size: int) -> str | None:
        ax = table[name]
        return ax if ax in mesh.shape and size % mesh.shape[ax] == 0 else None

    return PartitionSpec(axis("batch", batch), None, axis("heads", heads), None)


class DecodeStep(NamedTuple):
    """Where the new tokens of a decode call go: slots `index ..` (int32 scalar); row b's
    first real token sits at slot `pad_B[b]` (int32 B), the slots before it are padding."""

    index: Array
    pad_B: Array


def visible(q_slot_T: Array, k_slot_S: Array, pad_B: Array, window: int | None = None) -> Array:
    """B x T x S: query slot may see key slot (causal, unpadded, inside the band if banded)."""
    delta_TxS = q_slot_T[:, None] - k_slot_S[None, :]
    ok_TxS = delta_TxS >= 0
    if window is not None:
        ok_TxS &= delta_TxS < window
    return ok_TxS[None] & (k_slot_S[None, None, :] >= pad_B[:, None, None])


def dense_decode(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, k_cache_BxSxHxD: Array,
                 v_cache_BxSxHxD: Array, step: DecodeStep) -> tuple[Array, Array, Array]:
    """Writes the new keys/values at slots index.. of a full-length cache and attends over
    every visible slot. Returns (out BxTxHxD, updated key cache, updated value cache)."""
    t, s = q_BxTxHxD.shape[1], k_cache_BxSxHxD.shape[1]
    start = (0, step.index, 0, 0)
    k_cache_BxSxHxD = jax.lax.dynamic_update_slice(
        k_cache_BxSxHxD, k_BxTxHxD.astype(k_cache_BxSxHxD.dtype), start)
    v_cache_BxSxHxD = jax.lax.dynamic_update_slice(
        v_cache_BxSxHxD, v_BxTxHxD.astype(v_cache_BxSxHxD.dtype), start)
    mask_BxTxS = visible(step.index + jnp.arange(t), jnp.arange(s), step.pad_B)
    out = attend(q_BxTxHxD, k_cache_BxSxHxD, v_cache_BxSxHxD, mask_BxTxS)
    return out, k_cache_BxSxHxD, v_cache_BxSxHxD


def banded_decode(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, k_ring_BxWxHxD: Array,
                  v_ring_BxWxHxD: Array, step: DecodeStep, *, window: int
                  ) -> tuple[Array, Array, Array]:
    """Banded attention over a ring buffer of the last W <= window slots plus the new ones;
    then the ring keeps the newest W. Memory O(W) whatever the sequence length."""
    t, w = q_BxTxHxD.shape[1], k_ring_BxWxHxD.shape[1]
    ring_slot_W = step.index - w + (jnp.arange(w) - step.index) % w  # in [index - w, index)
    new_slot_T = step.index + jnp.arange(t)
    k_BxSxHxD = jnp.concatenate([k_ring_BxWxHxD, k_BxTxHxD.astype(k_ring_BxWxHxD.dtype)], 1)
    v_BxSxHxD = jnp.concatenate([v_ring_BxWxHxD, v_BxTxHxD.astype(v_ring_BxWxHxD.dtype)], 1)
    mask_BxTxS = visible(new_slot_T, jnp.concatenate([ring_slot_W, new_slot_T]), step.pad_B,
                         window)
    out = attend(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, mask_BxTxS)
    n = min(t, w)  # only the newest w of the new slots survive
    at_N = new_slot_T[t - n:] % w
    k_ring_BxWxHxD = k_ring_BxWxHxD.at[:, at_N].set(k_BxSxHxD[:, w + t - n:])
    v_ring_BxWxHxD = v_ring_BxWxHxD.at[:, at_N].set(v_BxSxHxD[:, w + t - n:])
    return out, k_ring_BxWxHxD, v_ring_BxWxHxD
