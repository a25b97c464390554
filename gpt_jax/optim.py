"""The papers' optimizers and learning-rate schedules.

Schedules are pure functions of the optimizer step. GPT-3 states its warmup, decay,
batch ramp and training length in tokens, and its batch ramps, so a step is not a fixed
number of tokens: the schedule's clock is then the number of microbatches consumed
before the step (`microbatches_consumed`, exact and a pure function of the step since
the ramp is), and token boundaries are converted at `tokens_per_microbatch`. Warmup
then ends at 375M tokens actually seen, the decay at 260B, training (`train.tokens`) at
300B, whatever the ramp. Configs that give their schedule in steps keep a clock of steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

Schedule = Callable[[Any], Any]


def tokens_per_step(cfg: ml_collections.ConfigDict) -> int:
    """Tokens of a full (after the ramp) step: `train.batch_size * model.context`."""
    return cfg.train.batch_size * cfg.model.context


def tokens_per_microbatch(cfg: ml_collections.ConfigDict) -> int:
    return tokens_per_step(cfg) // cfg.train.microbatches


@functools.lru_cache(maxsize=32)
def _ramp_starts(m: int, full: int, start_tokens: int, ramp_tokens: float) -> np.ndarray:
    """first_M[c - 1] = the first step that accumulates at least c microbatches.

    The batch grows linearly in steps from `start_tokens` to the full batch, rounded to
    whole microbatches; the ramp lasts K = 2R / (b0 + B) steps so that it consumes
    R = `ramp_tokens` tokens.
    """
    if not ramp_tokens:
        return np.zeros(m, np.int64)
    start = min(start_tokens, full)
    ramp_steps = 2.0 * ramp_tokens / (start + full)
    step_K = np.arange(math.ceil(ramp_steps) + 1, dtype=np.float64)
    tokens_K = start + (full - start) * np.minimum(step_K / ramp_steps, 1.0)
    count_K = np.clip(np.round(m * tokens_K / full), 1, m)
    return np.searchsorted(count_K, np.arange(1, m + 1), side="left").astype(np.int64)


def ramp_starts(cfg: ml_collections.ConfigDict) -> np.ndarray:
    """The M steps at which each of the M microbatches joins (all 0 without a ramp)."""
    o = cfg.optim
    return _ramp_starts(cfg.train.microbatches, tokens_per_step(cfg),
                        int(o.batch_ramp_start_tokens), float(o.batch_ramp_tokens))


def microbatches_at(cfg: ml_collections.ConfigDict, step: Any) -> Any:
    """GPT-3 batch-size ramp as the number of microbatches to accumulate at `step` (int32).

    The compiled step always sees the full microbatch shape and only this count changes,
    so nothing recompiles.
    """
    first_M = jnp.asarray(ramp_starts(cfg), jnp.int32)
    step = jnp.asarray(step, jnp.int32)
    return jnp.sum(step[..., None] >= first_M, axis=-1).astype(jnp.int32)


def microbatches_consumed(cfg: ml_collections.ConfigDict, steps: Any) -> Any:
    """Microbatches accumulated by the first `steps` steps: sum over c of max(0, steps -
    first step with c microbatches). Python/numpy ints give exact int64s, traced steps
    an int32."""
    first_M = ramp_starts(cfg)
    if isinstance(steps, jax.Array):  # traced or on device
        s = jnp.asarray(steps, jnp.int32)[..., None]
        return jnp.sum(jnp.maximum(s - jnp.asarray(first_M, jnp.int32), 0), axis=-1)
    out = np.maximum(np.asarray(steps, np.int64)[..., None] - first_M, 0).sum(-1)
    return int(out) if out.ndim == 0 else out


def tokens_consumed(cfg: ml_collections.ConfigDict, steps: Any) -> Any:
    """Tokens the model has trained on after `steps` optimizer steps (the ramp included)."""
    return microbatches_consumed(cfg, steps) * tokens_per_microbatch(cfg)


def steps_for_tokens(cfg: ml_collections.ConfigDict, tokens: float) -> int:
    """The first step count after which at least `tokens` tokens have been consumed."""
    if not tokens > 0:
        return 0
    first_M = ramp_starts(cfg)
    ramp_end = int(first_M[-1])
    need = math.ceil(tokens / tokens_per_microbatch(cfg))  # microbatches
    done = microbatches_consumed(cfg, ramp_end)
    if need >= done:  # after the ramp every step takes all M
        return ramp_end + math.ceil((need - done) / cfg.train.microbatches)
    consumed = microbatches_consumed(cfg, np.arange(ramp_end + 1))
    return int(np.searchsorted(consumed, need, side="left"))


def total_steps(cfg: ml_collections.ConfigDict) -> int:
    """`train.steps`, or with `train.tokens` > 0 the steps that consume that many tokens."""
    if cfg.train.get("tokens", 0):
        return steps_for_tokens(cfg, cfg.train.tokens)
    return cfg.train.steps


def _tokens_clock(cfg: ml_collections.ConfigDict) -> bool:
    return bool(cfg.optim.warmup_tokens or cfg.optim.decay_tokens)


def warmup_steps(cfg: ml_collections.ConfigDict) -> int:
    """The first step at the peak learning rate."""
    o = cfg.optim
    if o.warmup_tokens:
        return steps_for_tokens(cfg, o.warmup_tokens)
    if o.warmup_frac:
        return math.ceil(o.warmup_frac * total_steps(cfg))
    return o.warmup_steps


def decay_steps(cfg: ml_collections.ConfigDict) -> int:
    """Step at which the decay ends (the lr stays at its floor after it)."""
    o = cfg.optim
    if o.decay_tokens:
        return steps_for_tokens(cfg, o.decay_tokens)
    return o.decay_steps or total_steps(cfg)


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> Schedule:
    """lr(step): linear warmup from 0, then the configured decay to `final_lr_frac * peak`.

    The clock is the step, or, when warmup or decay is given in tokens, the microbatches
    consumed before the step (linear in tokens seen, the ramp included).
    """
    o = cfg.optim
    peak, floor = o.peak_lr, o.peak_lr * o.final_lr_frac
    if _tokens_clock(cfg):
        per = tokens_per_microbatch(cfg)
        step_clock = functools.partial(microbatches_consumed, cfg)
        warm = (o.warmup_tokens / per if o.warmup_tokens
                else float(step_clock(warmup_steps(cfg))))
        end = o.decay_tokens / per if o.decay_tokens else float(step_clock(decay_steps(cfg)))

        def clock(step: Any) -> Any:
            return microbatches_consumed(cfg, jnp.asarray(step)).astype(jnp.float32)
    else:
        warm, end = warmup_steps(cfg), decay_steps(cfg)
        clock = None
    end = max(end, warm + 1)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, end - warm, alpha=o.final_lr_frac)
    elif o.schedule == "linear":
        after = optax.linear_schedule(peak, floor, end - warm)
    else:
        after = optax.constant_schedule(peak)
    # peak * x / warm, not optax.linear_schedule: its peak * (1 - (1 - x / warm)) loses
    # float32 digits while x / warm is small (3e-4 relative at GPT-3's first steps)
    schedule = after if warm == 0 else optax.join_schedules(
        [lambda x: peak * (jnp.asarray(x, jnp.float32) / warm), after], [warm])
    base = schedule if clock is None else (lambda step: schedule(clock(step)))
    if o.get("extend_from_step", 0):
        return extended(base, int(o.extend_from_step), total_steps(cfg), floor, o.schedule)
    return base


def extended(base: Schedule, start: int, end: int, floor: float, shape: str) -> Schedule:
    """`base` until step `start`, then a new decay (in steps) from base(start), the rate the
    run has reached, to `floor` at step `end`: a run extended at `start` keeps a continuous
    learning rate (README "Extending a run"). `shape` is the schedule's: cosine, linear, or
    constant (stays at base(start))."""
    begin = float(base(start))
    span = max(end - start, 1)

    def lr(step: Any) -> Any:
        step = jnp.asarray(step)
        x = jnp.clip((step.astype(jnp.float32) - start) / span, 0.0, 1.0)
        frac = {"cosine": 0.5 * (1.0 + jnp.cos(jnp.pi * x)), "linear": 1.0 - x}.get(
            shape, jnp.ones_like(x))
        return jnp.where(step < start, base(step), floor + (begin - floor) * frac)

    return lr


def decay_mask(params: Any) -> Any:
    """Decoupled weight decay only on matrices (kernels, embeddings), not biases or LN gains.

    Keyed on the param name as well as rank: with scanned layers a stacked
    (layers, D) LN gain has rank 2 but must not decay.
    """
    def decays(path: tuple, x: Any) -> bool:
        name = getattr(path[-1], "key", str(path[-1]))
        return name in ("kernel", "embedding") and x.ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def muon_dimensions(params: Any) -> Any:
    """Muon's view of each GPT weight as matrices (x @ W), or None where Adam applies.

    Negative axes, so a scanned (layers, ...) stack adds a batch axis. The fused qkv
    kernel D x 3 x H x K is three D x (H*K) matrices (axis 3-of-qkv is a batch axis),
    as modded-nanogpt orthogonalises q, k and v apart; the attention output H x K x D
    is one (H*K) x D matrix. Embeddings (tied to the logits), LN gains and biases: Adam.
    """
    def dims(path: tuple, x: Any) -> Any:
        # Dict keys only: a flax box (abstract params at init) adds its attribute `value`.
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names[-1] != "kernel":
            return None
        if names[-2:] == ["qkv", "kernel"]:
            return MuonDimensionNumbers(reduction_axis=(-4,), output_axis=(-2, -1))
        if names[-3:] == ["attn", "proj", "kernel"]:
            return MuonDimensionNumbers(reduction_axis=(-3, -2), output_axis=(-1,))
        return MuonDimensionNumbers(reduction_axis=(-2,), output_axis=(-1,))

    return jax.tree_util.tree_map_with_path(dims, params)


def _scale_to_adam_rms(dims: Callable[[Any], Any], rms: float = 0.2
                       ) -> optax.GradientTransformation:
    """An orthogonal m x n update has RMS 1/sqrt(max(m, n)); scale it to `rms`, about
    AdamW's (Liu et al. 2025, "Muon is scalable for LLM training", eq. 4), so that
    `optim.muon_lr` reads on AdamW's scale whatever the matrix's shape."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        def scale(u: Any, d: Any) -> Any:
            fan_in = math.prod(u.shape[a] for a in d.reduction_axis)
            fan_out = math.prod(u.shape[a] for a in d.output_axis)
            return u * (rms * math.sqrt(max(fan_in, fan_out)))

        return jax.tree.map(scale, updates, dims(updates),
                            is_leaf=lambda x: isinstance(x, MuonDimensionNumbers)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (papers' betas/eps), masked decoupled weight decay, global-norm clipping.

    `optim.optimizer='muon'` (Jordan et al. 2024, modded-nanogpt) instead updates the
    hidden matrices with orthogonalised Nesterov momentum at peak `optim.muon_lr`, on the
    same schedule's shape, and keeps AdamW for embeddings, gains and biases.
    """
    o = cfg.optim
    chain = []
    if o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip))
    lr = learning_rate_schedule(cfg)
    adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decay_mask)
    if o.get("optimizer", "adamw") == "adamw":
        chain.append(adamw)
        return optax.chain(*chain)
    scale = o.muon_lr / o.peak_lr
    dims = muon_dimensions
    muon = optax.chain(
        scale_by_muon(beta=o.muon_momentum, nesterov=True, weight_dimension_numbers=dims),
        _scale_to_adam_rms(dims),
        optax.add_decayed_weights(o.weight_decay),
        optax.scale_by_learning_rate(lambda step: lr(step) * scale))

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda d: "adam" if d is None else "muon", dims(params),
                            is_leaf=lambda d: d is None or isinstance(d, tuple))

    chain.append(optax.partition({"muon": muon, "adam": adamw}, labels))
    return optax.chain(*chain)
