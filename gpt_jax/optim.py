"""The papers' optimizers and learning-rate schedules.

Schedules are pure functions of the optimizer step. GPT-3 states its warmup,
decay and batch ramp in tokens; they are converted to steps with the config's
full batch (`train.batch_size * model.context` tokens per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[Any], Any]


def tokens_per_step(cfg: ml_collections.ConfigDict) -> int:
    return cfg.train.batch_size * cfg.model.context


def warmup_steps(cfg: ml_collections.ConfigDict) -> int:
    o = cfg.optim
    if o.warmup_tokens:
        return math.ceil(o.warmup_tokens / tokens_per_step(cfg))
    if o.warmup_frac:
        return math.ceil(o.warmup_frac * cfg.train.steps)
    return o.warmup_steps


def decay_steps(cfg: ml_collections.ConfigDict) -> int:
    """Step at which the decay ends (the lr stays at its floor after it)."""
    o = cfg.optim
    if o.decay_tokens:
        return math.ceil(o.decay_tokens / tokens_per_step(cfg))
    return o.decay_steps or cfg.train.steps


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> Schedule:
    """lr(step): linear warmup from 0, then the configured decay to `final_lr_frac * peak`."""
    o = cfg.optim
    peak, floor = o.peak_lr, o.peak_lr * o.final_lr_frac
    warm, end = warmup_steps(cfg), max(decay_steps(cfg), warmup_steps(cfg) + 1)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, end - warm, alpha=o.final_lr_frac)
    elif o.schedule == "linear":
        after = optax.linear_schedule(peak, floor, end - warm)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def decay_mask(params: Any) -> Any:
    """Decoupled weight decay only on matrices (kernels, embeddings), not biases or LN gains.

    Keyed on the param name as well as rank: with scanned layers a stacked
    (layers, D) LN gain has rank 2 but must not decay.
    """
    def decays(path: tuple, x: Any) -> bool:
        name = getattr(path[-1], "key", str(path[-1]))
        return name in ("kernel", "embedding") and x.ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (papers' betas/eps), masked decoupled weight decay, global-norm clipping."""
    o = cfg.optim
    chain = []
    if o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip))
    chain.append(optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay_mask))
    return optax.chain(*chain)


def microbatches_at(cfg: ml_collections.ConfigDict, step: Any) -> Any:
    """GPT-3 batch-size ramp as the number of microbatches to accumulate at `step`.

    The batch grows linearly in steps from `batch_ramp_start_tokens` to the full
    batch; the ramp lasts K = 2R / (b0 + B) steps so that it consumes R =
    `batch_ramp_tokens` tokens. The compiled step always sees the full
    microbatch shape and only this count changes, so nothing recompiles.
    """
    o, m = cfg.optim, cfg.train.microbatches
    if not o.batch_ramp_tokens:
        return jnp.asarray(m, jnp.int32)
    full = tokens_per_step(cfg)
    start = min(o.batch_ramp_start_tokens, full)
    ramp_steps = 2 * o.batch_ramp_tokens / (start + full)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
    tokens = start + (full - start) * frac
    return jnp.clip(jnp.round(m * tokens / full), 1, m).astype(jnp.int32)
