"""PPO-ptx (InstructGPT step 3): the SFT policy optimised against the reward model.

`python -m gpt_jax.rlhf.ppo --config=experiments/rlhf/ppo.py --init_from=runs/sft
--config.ppo.reward_workdir=runs/rm --config.ppo.prompts_jsonl=prompts.jsonl
--workdir=runs/ppo`. One iteration:

1. rollout: `ppo.rollout_batch` prompts (a pure function of the data seed and the
   iteration) are continued by the policy with the KV-cache sampler (`gpt_jax.sample`,
   temperature `ppo.temperature`), keys folded from (seed, iteration, row);
2. score: the rows are re-laid out right-padded (prompt, response, eot padding) and one
   forward pass each of policy, frozen reference (the SFT params), value model and reward
   gives per-action log-probs, values and the score; the per-token reward is
   -beta * (log pi - log pi_ref), plus the score at the last response token; GAE (gamma,
   lambda) gives advantages (whitened) and returns;
3. update: `ppo.epochs` passes over the episodes in `ppo.minibatches` minibatches; each
   update minimises  clipped surrogate + value_coef * clipped value loss
   + ptx_coef * (-mean log pi(pretraining batch))  in ONE gradient (PPO-ptx; ptx_coef 0
   is plain PPO).

Token i of a row is action i - 1 (arrays of S - 1 "actions", suffix A): logp_BxA[:, i-1]
is log pi(token i | tokens < i), values_BxA[:, i-1] the value of the prefix tokens < i.
The value model is `reward.ScalarModel` read at every position, initialised from the
reward model's params (demonstration offset included); with a programmatic reward from
the policy's GPT and a zero head. Params, optimizer states, reference and reward params
all live on the training mesh with the shardings of the logical-axis rules.

Checkpoints (`gpt_jax.checkpoint.Checkpointer`, step = iterations done) hold
params = {'policy', 'value'}, opt_state = {'policy', 'value'} and meta; rerunning the
command resumes from the latest and, rollouts and batches being pure functions of
(seed, iteration), computes what an uninterrupted run would. At the end the policy alone
is saved as a plain GPT workdir in `<workdir>/policy` (`python -m gpt_jax.sample
--workdir=runs/ppo/policy`). Not done: the paper's EMA of policy weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import cli, loop, optim, rlhf, sample, sharding, steps
from gpt_jax import data as data_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.config import ConfigError
from gpt_jax.metrics import MetricsWriter
from gpt_jax.rlhf import common, reward
from gpt_jax.workdir import POLICY_DIR, Workdir, open_run

Array = jax.Array


# ---------------------------------------------------------------------------- pure pieces


def masked_mean(x: Array, mask: Array) -> Array:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def whiten(x_BxA: Array, mask_BxA: Array) -> Array:
    """(x - mean) / std over the masked entries; zero outside the mask."""
    mean = masked_mean(x_BxA, mask_BxA)
    var = masked_mean((x_BxA - mean) ** 2, mask_BxA)
    return (x_BxA - mean) * jax.lax.rsqrt(var + 1e-8) * mask_BxA


def action_logp(logits_BxSxV: Array, tokens_BxS: Array, vocab: int | None = None,
                temperature: float = 1.0) -> tuple[Array, Array]:
    """(log pi(token i | < i), entropy of that distribution) for i = 1..S-1: B x (S-1) each.
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


def kl_penalty_rewards(logp_BxA: Array, logp_ref_BxA: Array, score_B: Array, mask_BxA: Array,
                       beta: Array | float) -> Array:
    """Per-action reward: -beta * (log pi - log pi_ref) on response tokens, plus the
    sequence's score at its last response token."""
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


def right_align(seq_BxS: Array, pad_B: Array, prompt_slots: int, eot_id: int
                ) -> tuple[Array, Array]:
    """The sampler's rows (prompt left-padded in `prompt_slots`, then the response) ->
    (tokens right-padded with eot, action mask: 1 on response tokens up to the first eot)."""
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
    return tokens_BxS, mask_BxS[:, 1:].astype(jnp.float32)


# ---------------------------------------------------------------------------- compiled steps


class Experience(NamedTuple):
    """One iteration's episodes, B rows (actions A = S - 1)."""

    tokens_BxS: Array
    mask_BxA: Array
    logp_BxA: Array  # the rollout policy's
    values_BxA: Array
    adv_BxA: Array
    returns_BxA: Array


@dataclasses.dataclass
class Steps:
    """The jitted functions of one PPO config on one mesh."""

    rollout: Callable  # (policy params, prompts BxP, pad B, iteration) -> (tokens, mask)
    score: Callable  # (params, ref, reward params, tokens, mask, coefs) -> (Experience, metrics)
    update: Callable  # (state, experience, rows, ptx windows | None, coefs) -> (state, metrics)
    lm_nll: Callable  # (policy params, windows) -> mean next-token loss
    init_opt: Callable
    state_shardings: Any
    abstract_state: Any


def build_steps(cfg: ml_collections.ConfigDict, value_cfg: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh, vocab: int, eot_id: int, target_id: int | None
                ) -> Steps:
    """Jitted rollout, scoring and update for policy model `cfg.model` and value/reward model
    `value_cfg`; `target_id` selects the programmatic reward (None: the reward model).

    Memoised: runs in one process whose configs differ only in the coefficients
    `ppo.kl_coef` and `ppo.ptx_coef` (traced arguments of the steps) share compiled code."""
    key = cfg.copy_and_resolve_references()
    key.ppo.kl_coef = key.ppo.ptx_coef = 0.0  # not read by the steps: traced arguments
    return _build_steps(key.to_json(), value_cfg.to_json(), mesh, vocab, eot_id, target_id)


@functools.lru_cache(maxsize=4)
def _build_steps(cfg_json: str, value_json: str, mesh: jax.sharding.Mesh, vocab: int,
                 eot_id: int, target_id: int | None) -> Steps:
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    value_cfg = ml_collections.ConfigDict(json.loads(value_json))
    p = cfg.ppo
    policy, value = model_lib.GPT(cfg.model), reward.ScalarModel(value_cfg)
    boxed = {"policy": model_lib.abstract_params(cfg.model),
             "value": reward.abstract_params(value_cfg)}
    txs = optimizers(cfg)
    boxed_opt = {k: jax.eval_shape(txs[k].init, boxed[k]) for k in txs}
    param_sh = sharding.tree_shardings(boxed, mesh, cfg)
    opt_sh = sharding.tree_shardings(boxed_opt, mesh, cfg)
    repl = sharding.replicated(mesh)
    state_sh = {"params": param_sh, "opt_state": opt_sh}
    decoder = sample.make_decoder(cfg.model, sample.SamplingConfig(temperature=p.temperature),
                                  p.max_prompt_len, p.response_len, eot_id, vocab)

    def logp_of(params: Any, tokens_BxS: Array) -> tuple[Array, Array]:
        return action_logp(policy.apply({"params": params}, tokens_BxS), tokens_BxS, vocab,
                           p.temperature)

    def rollout(params: Any, prompt_BxP: Array, pad_B: Array, iteration: Array
                ) -> tuple[Array, Array]:
        key = jax.random.fold_in(jax.random.key(cfg.seed), iteration)
        keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(prompt_BxP.shape[0]))
        state = decoder.generate(params, prompt_BxP, pad_B, keys_B)
        return right_align(state.seq_BxS, pad_B, p.max_prompt_len, eot_id)

    def score(params: Any, ref: Any, reward_params: Any, tokens_BxS: Array, mask_BxA: Array,
              coefs: dict) -> tuple[Experience, dict]:
        logp_BxA, entropy_BxA = logp_of(params["policy"], tokens_BxS)
        logp_ref_BxA, _ = logp_of(ref, tokens_BxS)
        values_BxA = value.apply({"params": params["value"]}, tokens_BxS)[:, :-1]
        if target_id is None:
            score_B = reward.scores_at(value.apply({"params": reward_params}, tokens_BxS),
                                       last_index(mask_BxA) + 1)
        else:
            score_B = target_token_fraction(tokens_BxS, mask_BxA, target_id, eot_id)
        rewards_BxA = kl_penalty_rewards(logp_BxA, logp_ref_BxA, score_B, mask_BxA,
                                         coefs["kl_coef"])
        adv_BxA, returns_BxA = gae(rewards_BxA, values_BxA, mask_BxA, p.gamma, p.gae_lambda)
        if p.whiten_advantages:
            adv_BxA = whiten(adv_BxA, mask_BxA)
        metrics = {"reward": score_B.mean(),
                   "kl": ((logp_BxA - logp_ref_BxA) * mask_BxA).sum(1).mean(),
                   "entropy": masked_mean(entropy_BxA, mask_BxA),
                   "response_len": mask_BxA.sum(1).mean()}
        return Experience(tokens_BxS, mask_BxA, logp_BxA, values_BxA, adv_BxA,
                          returns_BxA), metrics

    def lm_nll(params: Any, windows_BxT1: Array) -> Array:
        total, count = steps.cross_entropy(policy.apply({"params": params}, windows_BxT1[:, :-1]),
                                           windows_BxT1[:, 1:])
        return total / count

    def loss(params: Any, mb: Experience, ptx_BxT1: Array | None, coefs: dict
             ) -> tuple[Array, dict]:
        logp_BxA, _ = logp_of(params["policy"], mb.tokens_BxS)
        pg, clip_frac = policy_loss(logp_BxA, mb.logp_BxA, mb.adv_BxA, mb.mask_BxA, p.clip)
        values_BxA = value.apply({"params": params["value"]}, mb.tokens_BxS)[:, :-1]
        vf = value_loss(values_BxA, mb.values_BxA, mb.returns_BxA, mb.mask_BxA, p.value_clip)
        total = pg + p.value_coef * vf
        metrics = {"policy_loss": pg, "value_loss": vf, "clip_frac": clip_frac}
        if ptx_BxT1 is not None:
            ptx = lm_nll(params["policy"], ptx_BxT1)  # -mean log pi(pretraining tokens)
            total, metrics["ptx_loss"] = total + coefs["ptx_coef"] * ptx, ptx
        return total, metrics

    def update(state: dict, exp: Experience, rows_b: Array, ptx_BxT1: Array | None,
               coefs: dict) -> tuple[dict, dict]:
        mb = jax.tree.map(lambda x: x[rows_b], exp)
        grads, metrics = jax.grad(loss, has_aux=True)(state["params"], mb, ptx_BxT1, coefs)
        params, opt_state = {}, {}
        for k, tx in txs.items():
            updates, opt_state[k] = tx.update(grads[k], state["opt_state"][k],
                                              state["params"][k])
            params[k] = jax.tree.map(jnp.add, state["params"][k], updates)
        return {"params": params, "opt_state": opt_state}, metrics

    abstract = {"params": model_lib.unbox(boxed), "opt_state": model_lib.unbox(boxed_opt)}
    return Steps(
        rollout=jax.jit(rollout), score=jax.jit(score), lm_nll=jax.jit(lm_nll),
        update=jax.jit(update, in_shardings=(state_sh, None, repl, None, repl),
                       out_shardings=(state_sh, repl), donate_argnums=(0,)),
        init_opt=jax.jit(lambda params: {k: txs[k].init(params[k]) for k in txs},
                         out_shardings=opt_sh),
        state_shardings=state_sh, abstract_state=abstract)


def optimizers(cfg: ml_collections.ConfigDict) -> dict:
    """AdamW (optim section) for the policy at optim.peak_lr and the value at ppo.value_lr;
    schedules count optimizer updates (train.steps)."""
    value_cfg = cfg.copy_and_resolve_references()
    value_cfg.optim.peak_lr = cfg.ppo.value_lr
    return {"policy": optim.make_optimizer(cfg), "value": optim.make_optimizer(value_cfg)}


# ---------------------------------------------------------------------------- the run


def ppo_config(cfg: ml_collections.ConfigDict, init_from: str
               ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(config with the policy's model and train.steps = optimizer updates, value model
    config: the reward model's, or the policy's for a programmatic reward)."""
    cfg = common.stage_config(cfg, init_from)
    p = cfg.ppo
    cfg.train.steps = p.iterations * p.epochs * p.minibatches
    if not p.ptx_context:
        p.ptx_context = cfg.model.context
    cfg = rlhf.validate(cfg)
    if p.reward == "model":
        value_cfg = Workdir(p.reward_workdir).read_config().model
        value_cfg.embd_pdrop = value_cfg.resid_pdrop = value_cfg.attn_pdrop = 0.0
        check = cfg.copy_and_resolve_references()
        check.model = value_cfg
        rlhf.validate(check)  # the value model must fit the mesh too
    else:
        value_cfg = cfg.model.copy_and_resolve_references()
    return cfg, value_cfg


def initial_params(cfg: ml_collections.ConfigDict, value_cfg: ml_collections.ConfigDict,
                   init_from: str, mesh: jax.sharding.Mesh, state_sh: Any) -> dict:
    """{'policy': the init workdir's GPT, 'value': the RM's params, or for a programmatic
    reward the init GPT with a zero head}, on the state shardings."""
    policy = open_run(init_from, mesh, rules=cfg).params
    if cfg.ppo.reward == "model":
        _, value = reward.load(cfg.ppo.reward_workdir, mesh, cfg)
    else:
        gpt = open_run(init_from, mesh, rules=cfg).params
        head = {"kernel": jnp.zeros((value_cfg.d_model, 1)), "bias": jnp.zeros((1,))}
        value = {"gpt": gpt, "head": head}
    return jax.device_put({"policy": policy, "value": value}, state_sh["params"])


def prompt_ids(cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> list[list[int]]:
    rows = data_lib.read_jsonl(cfg.ppo.prompts_jsonl, ("prompt",))
    return [tok.encode(r["prompt"]) or [tok.eot_id] for r in rows]


def target_token_id(cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> int | None:
    if cfg.ppo.reward != "target_token_fraction":
        return None
    ids = tok.encode(cfg.ppo.target_token)
    if len(ids) != 1:
        raise ConfigError(f"ppo.target_token={cfg.ppo.target_token!r} encodes to {len(ids)} "
                          "tokens; it must be exactly one")
    return ids[0]


def iteration_prompts(prompts: list[list[int]], cfg: ml_collections.ConfigDict, it: int,
                      mesh: jax.sharding.Mesh) -> tuple[Array, Array]:
    """Left-padded prompts BxP and their padding B of iteration `it`: positions
    [it * B, (it + 1) * B) of seeded per-epoch shuffles of the prompt file."""
    b = cfg.ppo.rollout_batch
    ids = data_lib.window_ids(len(prompts), cfg.data.seed, it * b, b)
    tokens, pad = sample.pad_prompts([prompts[i] for i in ids], cfg.ppo.max_prompt_len)
    lo, hi = loop.host_rows(b)
    return (sharding.host_local_to_global(tokens[lo:hi], mesh),
            sharding.host_local_to_global(pad[lo:hi], mesh))


def ptx_windows(corpus: data_lib.Corpus | None, cfg: ml_collections.ConfigDict, update: int,
                mesh: jax.sharding.Mesh) -> Array | None:
    """Update number `update`'s pretraining windows (ptx_batch_size x ptx_context + 1)."""
    if corpus is None:
        return None
    local = data_lib.train_batch(corpus.train, seed=cfg.data.seed, step=update,
                                 global_batch=cfg.ppo.ptx_batch_size,
                                 context=cfg.ppo.ptx_context, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    return sharding.host_local_to_global(local, mesh)


def run_iteration(s: Steps, state: dict, ref: Any, reward_params: Any, prompts: tuple,
                  it: int, cfg: ml_collections.ConfigDict, corpus: data_lib.Corpus | None,
                  mesh: jax.sharding.Mesh) -> tuple[dict, dict]:
    """Rollout, score and `epochs x minibatches` updates; (state, iteration metrics)."""
    p = cfg.ppo
    coefs = {"kl_coef": jnp.float32(p.kl_coef), "ptx_coef": jnp.float32(p.ptx_coef)}
    tokens_BxS, mask_BxA = s.rollout(state["params"]["policy"], *prompts, jnp.int32(it))
    exp, metrics = s.score(state["params"], ref, reward_params, tokens_BxS, mask_BxA, coefs)
    per = p.rollout_batch // p.minibatches
    updates = []
    for epoch in range(p.epochs):
        order = np.random.default_rng([cfg.seed, it, epoch]).permutation(p.rollout_batch)
        for m in range(p.minibatches):
            n = (it * p.epochs + epoch) * p.minibatches + m
            state, u = s.update(state, exp, jnp.asarray(order[m * per:(m + 1) * per]),
                                ptx_windows(corpus, cfg, n, mesh), coefs)
            updates.append(u)
    metrics.update({k: jnp.mean(jnp.stack([u[k] for u in updates])) for k in updates[0]})
    return state, {k: float(v) for k, v in metrics.items()}


def train_ppo(cfg: ml_collections.ConfigDict, init_from: str, workdir: str) -> dict:
    """PPO(-ptx) from the SFT workdir `init_from` to `ppo.iterations`, resuming from
    `workdir`; returns the last iteration's metrics."""
    cfg, value_cfg = ppo_config(cfg, init_from)
    p = cfg.ppo
    tok = Workdir(init_from).tokenizer()
    if p.reward == "model":
        common.check_same_tokenizer(init_from, p.reward_workdir)
    mesh = sharding.make_mesh(cfg)
    for field, rows in (("ppo.rollout_batch", p.rollout_batch // p.minibatches),
                        ("ppo.ptx_batch_size", p.ptx_batch_size or mesh.shape["data"])):
        if rows % (mesh.shape["data"] * jax.process_count()):
            raise ConfigError(f"{field}: {rows} rows per update do not split over the data "
                              f"axis ({mesh.shape['data']}) and hosts")
    prompts = prompt_ids(cfg, tok)
    target = target_token_id(cfg, tok)
    corpus = data_lib.prepare(cfg) if p.ptx_batch_size else None
    s = build_steps(cfg, value_cfg, mesh, tok.vocab_size, tok.eot_id, target)

    Workdir(workdir).save_tokenizer(tok)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep)
    start = ckpt.latest_step()
    if start is None:
        params = initial_params(cfg, value_cfg, init_from, mesh, s.state_shardings)
        state, start = {"params": params, "opt_state": s.init_opt(params)}, 0
    else:
        state = ckpt.restore(start, *(ckpt_lib.abstract_with_shardings(
            s.abstract_state[k], s.state_shardings[k]) for k in ("params", "opt_state")))
        state = {"params": state["params"], "opt_state": state["opt_state"]}
        if jax.process_index() == 0:
            print(f"resuming from iteration {start} in {ckpt.directory}")
    Workdir(workdir).write_config(cfg)  # only once restore passed
    ref = open_run(init_from, mesh, rules=cfg).params
    reward_params = reward.load(p.reward_workdir, mesh, cfg)[1] if target is None else None

    writer, preemption, final = MetricsWriter(workdir), loop.Preemption(), {}
    for it in range(start, p.iterations):
        tic = time.perf_counter()
        state, final = run_iteration(s, state, ref, reward_params,
                                     iteration_prompts(prompts, cfg, it, mesh), it, cfg, corpus,
                                     mesh)
        final["iteration_s"] = time.perf_counter() - tic
        done = it + 1
        writer.write(done, final)
        if jax.process_index() == 0 and (done % cfg.train.log_every == 0 or done == 1):
            print(f"iteration {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
        stop = preemption.reached(done)
        if done % cfg.train.ckpt_every == 0 or done == p.iterations or stop:
            ckpt.save(done, state["params"], state["opt_state"],
                      {"step": done, "iteration": done, "seed": cfg.seed,
                       "init_from": init_from, "reward_workdir": p.reward_workdir}, force=stop)
            writer.flush()
        if stop:
            logging.warning("SIGTERM: checkpointed iteration %d, exiting", done)
            break
    ckpt.close()
    writer.close()
    if not preemption.requested:
        export_policy(cfg, state["params"]["policy"], state["opt_state"]["policy"], tok,
                      Workdir(workdir) / POLICY_DIR, p.iterations)
    return final


def export_policy(cfg: ml_collections.ConfigDict, params: Any, opt_state: Any,
                  tok: tokenizer_lib.Tokenizer, directory: str | os.PathLike, step: int) -> None:
    """The policy (and its optimizer state) as a plain GPT workdir (config, tokenizer, one
    checkpoint): for sampling, evaluation, or as another stage's `init_from`."""
    Workdir(directory).write_config(cfg)
    Workdir(directory).save_tokenizer(tok)
    ckpt = ckpt_lib.Checkpointer(directory, keep=1, async_save=False)
    ckpt.save(step, params, opt_state, {"step": step}, force=True)
    ckpt.close()


def main(argv: list[str]) -> None:
    del argv
    cli.start()
    train_ppo(flags.FLAGS.config, flags.FLAGS.init_from, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_run_flags("PPO config (experiments/rlhf/ppo.py).", init_from=True)
    cli.run(main)
