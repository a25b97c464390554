"""Model FLOPs per token, the device's peak (from `chips`) and MFU: the one formula every
MFU figure here uses (the trainer's log, `bench`, `compile` and `plan`).

    MFU = tokens/s x flops_per_token / (chips x peak bf16 FLOP/s per chip)

    flops_per_token = 6 N' + 12 L d A,   A = sum over layers of the keys a query attends
                                         over / L (context T for dense layers, min(W, T)
                                         for banded layers of window W)

N' is every parameter except the position table (no matmul reads it; the tied token
embedding is the logits matmul and counts). 6 N' is the forward (2 N') plus backward
(4 N') multiply-adds of the weight matmuls (Kaplan et al. 2020, sec. 2.1); 12 L d T is
the QK^T and AV matmuls forward and backward, taken over the full T x T square as PaLM
does (Chowdhery et al. 2022, appendix B), not halved for the causal mask, and nanoGPT's
`estimate_mfu` does the same. Remat's recomputed forward is not model work and is not
counted (that would be hardware FLOPs utilisation); see `tests/test_flops.py` for the
hand calculations of GPT-2 small and GPT-3 175B.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from gpt_jax import chips, model


def flops_per_token(model_cfg: ml_collections.ConfigDict, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6 N' + 12 L d A (module docstring), where banded layers
    attend over their window instead of the whole context. N' excludes the position
    table, which costs no matmul."""
    m = model_cfg
    if n_params is None:
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(
            model.unbox(model.abstract_params(m))))
    n_matmul = n_params - m.context * m.d_model
    attn = sum(min(m.window, m.context) if model.is_banded(m, i) else m.context
               for i in range(m.n_layer))
    return 6.0 * n_matmul + 12.0 * m.d_model * attn


def mfu(tokens_per_s: float, flops_per_token_: float, peak_flops: float,
        num_chips: int = 1) -> float:
    """Model FLOPs utilisation: tokens/s (over all chips) x model FLOPs per token /
    (chips x each chip's peak FLOP/s)."""
    return tokens_per_s * flops_per_token_ / (num_chips * peak_flops)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of a device from `chips.CHIPS`, or None (e.g. CPUs: measure
    instead)."""
    chip = chips.chip_of(device)
    return None if chip is None else chip.peak_flops
