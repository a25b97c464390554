"""The reinforcement-learning math of PPO-ptx, as pure functions of arrays.

Shapes: a row is one episode, `prompt + response` right-padded; token i of a row is
action i - 1, so per-action arrays have A = S - 1 columns (suffix A) and `mask_BxA` is 1
on the response's actions (its eot included when it ended). References: PPO (Schulman et
al. 2017, clipped surrogate, eq. 7), GAE (Schulman et al. 2016, eq. 16), the per-token KL
penalty of Ziegler et al. (2019) and InstructGPT (Ouyang et al. 2022, eq. 2), TRL's
`missing_eos_penalty` for responses that never end.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of `x` over the entries where `mask` is 1 (0 when there are none)."""
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def whiten(x_BxA: Array, mask_BxA: Array) -> Array:
    """(x - mean) / std over the masked entries; zero outside the mask."""
    mean = masked_mean(x_BxA, mask_BxA)
    var = masked_mean((x_BxA - mean) ** 2, mask_BxA)
    return (x_BxA - mean) * jax.lax.rsqrt(var + 1e-8) * mask_BxA


def action_logp(logits_BxSxV: Array, tokens_BxS: Array, vocab: int | None = None,
                temperature: float = 1.0) -> tuple[Array, Array]:
    """(log pi(token i | < i), entropy of that distribution) for i = 1..S-1: B x A each.
    Ids >= `vocab` (never sampled) get no mass; logits are divided by the temperature."""
    logits = logits_BxSxV[:, :-1].astype(jnp.float32) / temperature
    if vocab is not None and vocab < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
    logp_BxAxV = jax.nn.log_softmax(logits, axis=-1)
    logp_BxA = jnp.take_along_axis(logp_BxAxV, tokens_BxS[:, 1:, None], axis=-1)[..., 0]
    p = jnp.exp(logp_BxAxV)
    entropy_BxA = -jnp.where(p > 0, p * logp_BxAxV, 0.0).sum(-1)
    return logp_BxA, entropy_BxA


def last_index(mask_BxA: Array) -> Array:
    """Index of each row's last masked (1) entry."""
    a = mask_BxA.shape[1]
    return a - 1 - jnp.argmax(mask_BxA[:, ::-1] > 0, axis=1)


def right_align(seq_BxS: Array, pad_B: Array, prompt_slots: int, eot_id: int
                ) -> tuple[Array, Array, Array]:
    """The sampler's rows (prompt left-padded in `prompt_slots`, then the response) ->
    (tokens right-padded with eot, action mask: 1 on response tokens up to and including
    the first eot, ended B: whether the response produced an eot before the length limit)."""
    b, s = seq_BxS.shape
    src_BxS = jnp.arange(s)[None, :] + pad_B[:, None]
    tokens_BxS = jnp.where(src_BxS < s, jnp.take_along_axis(seq_BxS, jnp.minimum(src_BxS, s - 1),
                                                            axis=1), eot_id)
    gen_BxN = seq_BxS[:, prompt_slots:]
    ended_B = jnp.any(gen_BxN == eot_id, axis=1)
    resp_len_B = jnp.where(ended_B, jnp.argmax(gen_BxN == eot_id, axis=1) + 1, gen_BxN.shape[1])
    start_B = prompt_slots - pad_B  # index of the first response token
    slot_S = jnp.arange(s)[None, :]
    mask_BxS = (slot_S >= start_B[:, None]) & (slot_S < (start_B + resp_len_B)[:, None])
    return tokens_BxS, mask_BxS[:, 1:].astype(jnp.float32), ended_B


def missing_eot_scores(score_B: Array, ended_B: Array, penalty: Array | float) -> Array:
    """The score PPO optimises: a response cut off at the length limit without an eot is
    read by the reward model at a token it never scored in training, so it loses `penalty`
    (TRL's `missing_eos_penalty`)."""
    return jnp.where(ended_B, score_B, score_B - penalty)


def kl_penalty_rewards(logp_BxA: Array, logp_ref_BxA: Array, score_B: Array, mask_BxA: Array,
                       beta: Array | float) -> Array:
    """Per-action reward (InstructGPT eq. 2 without the ptx term):
    -beta * (log pi - log pi_SFT) on response tokens, plus the sequence's score at its last
    response token."""
    rewards_BxA = -beta * (logp_BxA - logp_ref_BxA) * mask_BxA
    rows_B = jnp.arange(mask_BxA.shape[0])
    return rewards_BxA.at[rows_B, last_index(mask_BxA)].add(score_B)


def gae(rewards_BxA: Array, values_BxA: Array, mask_BxA: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
    """(advantages, returns) by generalised advantage estimation over the masked actions
    (one contiguous episode per row; the value after the last action is 0):
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1}."""
    zeros_Bx1 = jnp.zeros_like(mask_BxA[:, :1])
    next_mask_BxA = jnp.concatenate([mask_BxA[:, 1:], zeros_Bx1], axis=1)
    next_values_BxA = jnp.concatenate([values_BxA[:, 1:], zeros_Bx1], axis=1) * next_mask_BxA
    deltas_BxA = (rewards_BxA + gamma * next_values_BxA - values_BxA) * mask_BxA

    def back(adv_next_B: Array, xs: tuple) -> tuple[Array, Array]:
        delta_B, next_mask_B, mask_B = xs
        adv_B = (delta_B + gamma * lam * next_mask_B * adv_next_B) * mask_B
        return adv_B, adv_B

    _, adv_AxB = jax.lax.scan(back, jnp.zeros_like(mask_BxA[:, 0]),
                              (deltas_BxA.T, next_mask_BxA.T, mask_BxA.T), reverse=True)
    adv_BxA = adv_AxB.T
    return adv_BxA, (adv_BxA + values_BxA) * mask_BxA


def policy_loss(logp_BxA: Array, logp_old_BxA: Array, adv_BxA: Array, mask_BxA: Array,
                clip: float) -> tuple[Array, Array]:
    """(PPO clipped surrogate loss, fraction of actions whose ratio was clipped)."""
    ratio_BxA = jnp.exp(logp_BxA - logp_old_BxA)
    surrogate_BxA = jnp.maximum(-adv_BxA * ratio_BxA,
                                -adv_BxA * jnp.clip(ratio_BxA, 1.0 - clip, 1.0 + clip))
    clipped_BxA = (jnp.abs(ratio_BxA - 1.0) > clip).astype(jnp.float32)
    return masked_mean(surrogate_BxA, mask_BxA), masked_mean(clipped_BxA, mask_BxA)


def value_loss(values_BxA: Array, values_old_BxA: Array, returns_BxA: Array, mask_BxA: Array,
               clip: float) -> Array:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V clipped to V_old +- clip."""
    clipped_BxA = values_old_BxA + jnp.clip(values_BxA - values_old_BxA, -clip, clip)
    err_BxA = jnp.maximum((values_BxA - returns_BxA) ** 2, (clipped_BxA - returns_BxA) ** 2)
    return 0.5 * masked_mean(err_BxA, mask_BxA)


def target_token_fraction(tokens_BxS: Array, mask_BxA: Array, target: int, eot_id: int) -> Array:
    """Programmatic reward: fraction of the response's tokens (eot excluded) equal to
    `target`; 0 for an empty response."""
    resp_BxA = tokens_BxS[:, 1:]
    real_BxA = mask_BxA * (resp_BxA != eot_id)
    hits_B = (real_BxA * (resp_BxA == target)).sum(1)
    return hits_B / jnp.maximum(real_BxA.sum(1), 1.0)


def ema(average: Any, params: Any, decay: float) -> Any:
    """decay * average + (1 - decay) * params, leaf by leaf (the policy EMA InstructGPT's
    released models use)."""
    return jax.tree.map(lambda a, p: (decay * a.astype(jnp.float32)
                                      + (1.0 - decay) * p.astype(jnp.float32)).astype(a.dtype),
                        average, params)
