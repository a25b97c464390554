"""Model FLOPs per token and the device's peak (from `chips`): every MFU figure's parts."""

from __future__ import annotations

import math

import jax
import ml_collections

from gpt_jax import chips, model


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


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of a device from `chips.CHIPS`, or None (e.g. CPUs: measure
    instead)."""
    chip = chips.chip_of(device)
    return None if chip is None else chip.peak_flops
