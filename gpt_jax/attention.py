"""Causal self-attention kernels: dense, and GPT-3's locally banded layers.

All functions take per-head tensors `q_BxTxHxD`, `k_BxSxHxD`, `v_BxSxHxD` in the
compute dtype and return `BxTxHxD`. Scores and softmax are computed in float32.

Banded attention (Sparse Transformer "local" pattern, used by GPT-3's odd
layers): query i sees key j iff 0 <= i - j < window. It is computed blockwise
with blocks of `window` queries, each attending only to its own block and the
one before, so cost and memory are O(T * window) instead of O(T^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def attend(q_BxTxHxD: Array, k_BxSxHxD: Array, v_BxSxHxD: Array, mask_BxTxS: Array | None,
           *, is_causal: bool = False, dropout_rate: float = 0.0,
           dropout_rng: Array | None = None, implementation: str | None = None) -> Array:
    """Softmax attention with an optional boolean mask (True = may attend).

    Without attention dropout this is `jax.nn.dot_product_attention`, so fused
    kernels (cuDNN flash attention on GPU) are used where the backend has them.
    With dropout (training GPT-1/2 style) the probabilities are materialised.
    """
    mask = None if mask_BxTxS is None else mask_BxTxS[:, None, :, :]  # B x 1 x T x S
    if dropout_rate == 0.0 or dropout_rng is None:
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
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v_BxSxHxD.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v_BxSxHxD)


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
