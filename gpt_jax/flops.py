"""Model FLOPs per token and accelerator peaks: the numbers behind every MFU figure."""

from __future__ import annotations

import math

import jax
import ml_collections

from gpt_jax import model


def flops_per_token(model_cfg: ml_collections.ConfigDict, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12 * n_layer * d_model * context (PaLM/nanoGPT),
    where banded layers attend over their window instead of the whole context.
    N excludes the position table, which costs no matmul."""
    m = model_cfg
    if n_params is None:
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(
            model.unbox(model.abstract_params(m))))
    n_matmul = n_params - m.context * m.d_model
    attn = sum(min(m.window, m.context) if model.is_banded(m, i) else m.context
               for i in range(m.n_layer))
    return 6.0 * n_matmul + 12.0 * m.d_model * attn


# Peak dense bf16 FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of a device from the table, or None (e.g. CPUs: measure instead)."""
    kind = (device or jax.devices()[0]).device_kind
    matches = [k for k in PEAK_FLOPS if kind.startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None
