"""Mixed precision's rule for the matmuls whose results must be float32.

Attention scores and the logits are computed from compute-dtype (bfloat16) operands and
accumulated and returned in float32, because the softmax after them needs the range
and the precision. Left to autodiff, the backward of such a matmul multiplies the float32
cotangent with the other bfloat16 operand: a mixed float32 x bfloat16 dot, which XLA
executes at float32 speed (several MXU passes on TPU) for the two largest backward
matmuls of a small GPT (the logits' are 2/3 of its unembedding FLOPs).

The intended dtypes, and what the HLO shows (tests/test_compile.py): forward bf16 x bf16
-> f32; backward, the cotangent is rounded to the operands' dtype once (after the
softmax's own float32 gradient) and both gradient matmuls are bf16 x bf16 -> bf16, as
mixed-precision training does for every other matmul (Micikevicius et al. 2018, "Mixed
Precision Training": float32 master weights and reductions, half-precision products).
With float32 operands nothing changes: the cotangent is already float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: Array, b: Array) -> Array:
    """`jnp.einsum(spec, a, b)` accumulated and returned in float32; gradients in a's dtype."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(spec: str, a: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    if a.dtype != b.dtype:
        raise TypeError(f"einsum_f32 {spec!r}: operands differ in dtype ({a.dtype}, {b.dtype})")
    return einsum_f32(spec, a, b), (a, b)


def _backward(spec: str, operands: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    a, b = operands
    _, vjp = jax.vjp(functools.partial(jnp.einsum, spec), a, b)
    return vjp(g.astype(a.dtype))


einsum_f32.defvjp(_forward, _backward)
