"""Causal self-attention kernels: dense, and GPT-3's locally banded layers.

All functions take per-head tensors `q_BxTxHxD`, `k_BxSxHxD`, `v_BxSxHxD` in the
compute dtype and return `BxTxHxD`. Scores and softmax are computed in float32.

Banded attention (Sparse Transformer "local" pattern, used by GPT-3's odd
layers): query i sees key j iff 0 <= i - j < window. It is computed blockwise
with blocks of `window` queries, each attending only to its own block and the
one before, so cost and memory are O(T * window) instead of O(T^2).

KV-cache decoding (`dense_decode`, `banded_decode`): T new tokens at once (the
whole left-padded prompt, then one token per step) go to cache slots
`index .. index+T-1`, the same slots for every row; row b's real tokens start at
slot `pad_B[b]` and earlier (padding) slots are never attended. Dense layers keep
every slot; banded layers keep only the last `window` keys in a ring buffer
(slot s lives at s % window).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def attend(q_BxTxHxD: Array, k_BxSxHxD: Array, v_BxSxHxD: Array, mask_BxTxS: Array | None,
           *, is_causal: bool = False, dropout_rate: float = 0.0,
           dropout_rng: Array | None = None, implementation: str | None = None) -> Array:
    """Softmax attention with an optional boolean mask (True = may attend).

    Without attention dropout on accelerators this is `jax.nn.dot_product_attention`,
    so fused kernels (cuDNN flash attention on GPU) are used where the backend has
    them. With dropout (training GPT-1/2 style), and on CPU, where XLA has no fused
    kernel and the explicit form below measured ~8% faster for the tiny config's
    train step, the probabilities are materialised.
    """
    mask = None if mask_BxTxS is None else mask_BxTxS[:, None, :, :]  # B x 1 x T x S
    no_dropout = dropout_rate == 0.0 or dropout_rng is None
    if no_dropout and not (implementation in (None, "auto", "xla") and _on_cpu()):
        impl = None if implementation in (None, "auto") else implementation
        return jax.nn.dot_product_attention(
            q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, mask=mask, is_causal=is_causal,
            implementation=impl)
    depth = q_BxTxHxD.shape[-1]
    logits_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD, k_BxSxHxD,
                                preferred_element_type=jnp.float32) / jnp.sqrt(depth)
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


def _on_cpu() -> bool:
    """True when tracing for the CPU backend (the default backend is what jit uses)."""
    return jax.default_backend() == "cpu"


def dense_causal(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, **kw) -> Array:
    """Every position attends to itself and all earlier positions."""
    return attend(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, None, is_causal=True, **kw)


def band_mask(q_pos: Array, k_pos: Array, window: int) -> Array:
    """True where key position may be seen by query position: 0 <= q - k < window."""
    delta = q_pos[..., :, None] - k_pos[..., None, :]
    return (delta >= 0) & (delta < window)


def banded_causal(q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array, *, window: int,
                  **kw) -> Array:
    """Locally banded causal attention in blocks of `window` queries: O(T * window)."""
    b, t, h, d = q_BxTxHxD.shape
    if t <= window:  # the band covers every causal pair
        return dense_causal(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, **kw)
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
