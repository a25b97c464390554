"""PPO-ptx (InstructGPT step 3): the SFT policy optimised against the reward model.

`python -m gpt_jax.rlhf.ppo --config=experiments/rlhf/ppo.py --init_from=runs/sft
--config.ppo.reward_workdir=runs/rm --config.ppo.prompts_jsonl=prompts.jsonl
--workdir=runs/ppo`. One iteration is one step of the shared loop (`loop.run`, through
`Task.make_step`), so restore or init, sharding and activation constraints, the NaN stop,
SIGTERM, metrics and checkpoints are the pretraining ones. Per iteration:

1. rollout: `ppo.rollout_batch` prompts (a pure function of the data seed and the
   iteration) are continued by the policy with the KV-cache sampler (`gpt_jax.sample`,
   temperature `ppo.temperature`), keys folded from (seed, iteration, row);
2. score: one forward pass each of policy, frozen reference (the SFT params), value model
   and reward gives per-action log-probs, values and the score s(x, y) read at the
   response's eot; a response cut off at `ppo.response_len` without an eot loses
   `ppo.missing_eot_penalty`; the per-token reward is -beta (log pi - log pi_SFT) plus the
   score at the last response token (InstructGPT eq. 2); GAE gives advantages (whitened)
   and returns (`rl.py` holds this math);
3. update: `ppo.epochs` passes over the episodes in `ppo.minibatches` minibatches; each
   update minimises  clipped surrogate + value_coef * clipped value loss
   + ptx_coef * (-mean log pi(pretraining batch))  in ONE gradient (PPO-ptx; ptx_coef 0 is
   plain PPO), then moves the policy EMA (`ppo.ema_decay`) towards the new policy.

Every `train.eval_every` iterations (and at iteration 0, the SFT policy) the policy, and
its EMA, answer the validation prompts `ppo.eval_prompts_jsonl` (`ppo.eval_samples` each,
the same keys every time): reward-model score, KL to SFT, fraction ending with eot,
fraction well formed by `ppo.eval_rule` and the mean count of `ppo.eval_target`, in
metrics.jsonl as `eval_*` and `ema_eval_*`; these are for tuning (and the loop's best
checkpoint). After the last iteration the SFT policy, the final policy and its EMA answer
the test prompts `ppo.test_prompts_jsonl` once, the same way: `<workdir>/test_report.json`
(`sft_test_*`, `test_*`, `ema_test_*`), the numbers to report.

The value model is `reward.ScalarModel` read at every position, initialised from the
reward model's params (demonstration offset included); with a programmatic reward from the
policy's GPT and a zero head. Checkpoints (step = iterations done) hold params =
{'policy', 'value'} (+ 'ema') and opt_state = {'policy', 'value'}; rollouts, minibatch
orders and pretraining batches are pure functions of (seed, iteration), so a resumed run
computes exactly what an uninterrupted one would. At the end the policy is saved as a plain
GPT workdir, `<workdir>/policy` (and the EMA as `<workdir>/policy_ema`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from jax.experimental import multihost_utils

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import cli, loop, optim, rlhf, sample, sharding, steps
from gpt_jax import data as data_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.config import ConfigError
from gpt_jax.rlhf import common, reward, rl
from gpt_jax.workdir import POLICY_DIR, Workdir, open_run

Array = jax.Array
EMA_POLICY_DIR = "policy_ema"
TEST_REPORT = "test_report.json"  # the test split's one evaluation, after the last iteration
TRAIN_STREAM, EVAL_STREAM = 0, 1  # rollout key streams


# ---------------------------------------------------------------------------- toy-task rules


def python_function_body(prompt: str, response: str) -> bool:
    """The toy world's rule: `prompt + response` parses as exactly one Python function."""
    try:
        tree = ast.parse(prompt + response)
    except (SyntaxError, ValueError):
        return False
    return len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef)


RULES: dict[str, Callable[[str, str], bool]] = {"python_function": python_function_body}


# ---------------------------------------------------------------------------- compiled steps


class Judged(NamedTuple):
    """What the frozen models say about a batch of episodes."""

    logp_BxA: Array  # the policy's
    logp_ref_BxA: Array  # the SFT policy's
    entropy_BxA: Array
    score_B: Array  # reward model (or programmatic reward), before the missing-eot penalty


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

    # (policy, prompts BxP, pad B, stream, index) -> (tokens BxS, mask BxA, ended B)
    rollout: Callable
    judge: Callable  # (policy, ref, reward params, tokens, mask) -> Judged
    experience: Callable  # (params, judged, tokens, mask, ended, coefs) -> (Experience, metrics)
    update: Callable  # (state, experience, rows, ptx windows | None, coefs) -> (state, metrics)


def per_key(txs: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One optimizer over a dict of params: `txs[k]` updates `params[k]`; keys without an
    optimizer (the policy EMA) have no state and no gradient."""

    def init(params: Any) -> dict:
        return {k: tx.init(params[k]) for k, tx in txs.items()}

    def update(grads: Any, state: dict, params: Any = None) -> tuple[dict, dict]:
        out = {k: tx.update(grads[k], state[k], None if params is None else params[k])
               for k, tx in txs.items()}
        return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}

    return optax.GradientTransformation(init, update)


def num_updates(cfg: ml_collections.ConfigDict) -> int:
    p = cfg.ppo
    return p.iterations * p.epochs * p.minibatches


def optimizers(cfg: ml_collections.ConfigDict) -> dict[str, optax.GradientTransformation]:
    """AdamW (optim section) for the policy at optim.peak_lr and the value at ppo.value_lr;
    their schedules count optimizer updates."""
    policy_cfg = cfg.copy_and_resolve_references()
    policy_cfg.train.steps = num_updates(cfg)
    value_cfg = policy_cfg.copy_and_resolve_references()
    value_cfg.optim.peak_lr = cfg.ppo.value_lr
    return {"policy": optim.make_optimizer(policy_cfg), "value": optim.make_optimizer(value_cfg)}


def boxed_params(cfg: ml_collections.ConfigDict, value_cfg: ml_collections.ConfigDict) -> dict:
    policy = model_lib.abstract_params(cfg.model)
    boxed = {"policy": policy, "value": reward.abstract_params(value_cfg)}
    if cfg.ppo.ema_decay:
        boxed["ema"] = policy
    return boxed


def build_steps(cfg: ml_collections.ConfigDict, value_cfg: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh, vocab: int, eot_id: int, target_id: int | None
                ) -> Steps:
    """The jitted rollout, judge, experience and update of `cfg` on `mesh` (cached: runs
    differing only in coefficients or paths share compiled steps)."""
    key = cfg.copy_and_resolve_references()
    key.ppo.kl_coef = key.ppo.ptx_coef = key.ppo.missing_eot_penalty = 0.0  # traced
    for field in ("prompts_jsonl", "eval_prompts_jsonl", "test_prompts_jsonl",
                  "reward_workdir", "name"):
        if field in key.ppo:
            key.ppo[field] = ""
    return _build_steps(key.to_json(), value_cfg.to_json(), mesh, vocab, eot_id, target_id)


@functools.lru_cache(maxsize=4)
def _build_steps(cfg_json: str, value_json: str, mesh: jax.sharding.Mesh, vocab: int,
                 eot_id: int, target_id: int | None) -> Steps:
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    value_cfg = ml_collections.ConfigDict(json.loads(value_json))
    p = cfg.ppo
    policy, value = model_lib.GPT(cfg.model), reward.ScalarModel(value_cfg)
    tx = per_key(optimizers(cfg))
    boxed = boxed_params(cfg, value_cfg)
    repl = sharding.replicated(mesh)
    state_sh = {"step": repl, "params": sharding.tree_shardings(boxed, mesh, cfg),
                "opt_state": sharding.tree_shardings(jax.eval_shape(tx.init, boxed), mesh, cfg)}
    decoder = sample.make_decoder(cfg.model, sample.SamplingConfig(temperature=p.temperature),
                                  p.max_prompt_len, p.response_len, eot_id, vocab)

    def logp_of(params: Any, tokens_BxS: Array) -> tuple[Array, Array]:
        return rl.action_logp(policy.apply({"params": params}, tokens_BxS), tokens_BxS, vocab,
                              p.temperature)

    def rollout(params: Any, prompt_BxP: Array, pad_B: Array, stream: Array, index: Array
                ) -> tuple[Array, Array, Array]:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), stream), index)
        keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(prompt_BxP.shape[0]))
        state = decoder.generate(params, prompt_BxP, pad_B, keys_B)
        return rl.right_align(state.seq_BxS, pad_B, p.max_prompt_len, eot_id)

    def judge(params: Any, ref: Any, reward_params: Any, tokens_BxS: Array, mask_BxA: Array
              ) -> Judged:
        logp_BxA, entropy_BxA = logp_of(params, tokens_BxS)
        logp_ref_BxA, _ = logp_of(ref, tokens_BxS)
        if target_id is None:
            score_B = reward.scores_at(value.apply({"params": reward_params}, tokens_BxS),
                                       rl.last_index(mask_BxA) + 1)
        else:
            score_B = rl.target_token_fraction(tokens_BxS, mask_BxA, target_id, eot_id)
        return Judged(logp_BxA, logp_ref_BxA, entropy_BxA, score_B)

    def experience(params: Any, j: Judged, tokens_BxS: Array, mask_BxA: Array, ended_B: Array,
                   coefs: dict) -> tuple[Experience, dict]:
        values_BxA = value.apply({"params": params["value"]}, tokens_BxS)[:, :-1]
        score_B = rl.missing_eot_scores(j.score_B, ended_B, coefs["missing_eot_penalty"])
        rewards_BxA = rl.kl_penalty_rewards(j.logp_BxA, j.logp_ref_BxA, score_B, mask_BxA,
                                            coefs["kl_coef"])
        adv_BxA, returns_BxA = rl.gae(rewards_BxA, values_BxA, mask_BxA, p.gamma, p.gae_lambda)
        if p.whiten_advantages:
            adv_BxA = rl.whiten(adv_BxA, mask_BxA)
        metrics = {"reward": j.score_B.mean(), "score": score_B.mean(),
                   "ended": ended_B.astype(jnp.float32).mean(),
                   "kl": ((j.logp_BxA - j.logp_ref_BxA) * mask_BxA).sum(1).mean(),
                   "entropy": rl.masked_mean(j.entropy_BxA, mask_BxA),
                   "response_len": mask_BxA.sum(1).mean()}
        return Experience(tokens_BxS, mask_BxA, j.logp_BxA, values_BxA, adv_BxA,
                          returns_BxA), metrics

    def lm_nll(params: Any, windows_BxT1: Array) -> Array:
        total, count = steps.cross_entropy(policy.apply({"params": params}, windows_BxT1[:, :-1]),
                                           windows_BxT1[:, 1:])
        return total / count

    def loss(params: Any, mb: Experience, ptx_BxT1: Array | None, coefs: dict
             ) -> tuple[Array, dict]:
        logp_BxA, _ = logp_of(params["policy"], mb.tokens_BxS)
        pg, clip_frac = rl.policy_loss(logp_BxA, mb.logp_BxA, mb.adv_BxA, mb.mask_BxA, p.clip)
        values_BxA = value.apply({"params": params["value"]}, mb.tokens_BxS)[:, :-1]
        vf = rl.value_loss(values_BxA, mb.values_BxA, mb.returns_BxA, mb.mask_BxA, p.value_clip)
        total = pg + p.value_coef * vf
        metrics = {"policy_loss": pg, "value_loss": vf, "clip_frac": clip_frac}
        if ptx_BxT1 is not None:
            ptx = lm_nll(params["policy"], ptx_BxT1)  # -mean log pi(pretraining tokens)
            total, metrics["ptx_loss"] = total + coefs["ptx_coef"] * ptx, ptx
        return total, {**metrics, "loss": total}

    def update(state: dict, exp: Experience, rows_b: Array, ptx_BxT1: Array | None,
               coefs: dict) -> tuple[dict, dict]:
        params = state["params"]
        mb = jax.tree.map(lambda x: x[rows_b], exp)
        trained = {k: params[k] for k in ("policy", "value")}
        grads, metrics = jax.grad(loss, has_aux=True)(trained, mb, ptx_BxT1, coefs)
        updates, opt_state = tx.update(grads, state["opt_state"], trained)
        new = {**params, **optax.apply_updates(trained, updates)}
        if p.ema_decay:
            new["ema"] = rl.ema(params["ema"], new["policy"], p.ema_decay)
        metrics["grad_norm"] = steps.global_norm(grads["policy"])
        return {"step": state["step"], "params": new, "opt_state": opt_state}, metrics

    return Steps(rollout=jax.jit(rollout), judge=jax.jit(judge),
                 experience=jax.jit(experience),
                 update=jax.jit(update, in_shardings=(state_sh, None, repl, None, repl),
                                out_shardings=(state_sh, repl), donate_argnums=(0,)))


# ---------------------------------------------------------------------------- config and data


def ppo_config(cfg: ml_collections.ConfigDict, init_from: str
               ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(config with the policy's model and train.steps = iterations, value model config:
    the reward model's, or the policy's for a programmatic reward)."""
    cfg = common.stage_config(cfg, init_from)
    p = cfg.ppo
    cfg.train.steps = p.iterations
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


def check_reward_workdir(cfg: ml_collections.ConfigDict, init_from: str) -> None:
    """The reward model must read the policy's tokens: same tokenizer and vocabulary."""
    rm = cfg.ppo.reward_workdir
    rm_model = Workdir(rm).read_config().model
    if rm_model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"ppo.reward_workdir={rm!r} has model.vocab_size="
                          f"{rm_model.vocab_size}, the policy (--init_from={init_from!r}) "
                          f"{cfg.model.vocab_size}: the reward model must share its base model")
    if Workdir(rm).tokenizer().fingerprint != Workdir(init_from).tokenizer().fingerprint:
        raise ConfigError(f"ppo.reward_workdir={rm!r} uses another tokenizer than the policy "
                          f"(--init_from={init_from!r}): the reward model must share its base "
                          "model")


def read_prompts(cfg: ml_collections.ConfigDict, field: str, tok: tokenizer_lib.Tokenizer
                 ) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of the prompts file `ppo.<field>`; an empty file or a prompt longer
    than ppo.max_prompt_len is an error naming the file."""
    path = cfg.ppo[field]
    try:
        rows = data_lib.read_jsonl(path, ("prompt",))
    except (ValueError, OSError) as e:
        raise ConfigError(f"ppo.{field}={path!r}: {e}") from None
    texts = [r["prompt"] for r in rows]
    ids = [tok.encode(t) or [tok.eot_id] for t in texts]
    limit = cfg.ppo.max_prompt_len
    for n, row in enumerate(ids, 1):
        if len(row) > limit:
            raise ConfigError(
                f"ppo.{field}={path!r}: prompt {n} has {len(row)} tokens, more than "
                f"ppo.max_prompt_len={limit} (model.context={cfg.model.context} - "
                f"ppo.response_len={cfg.ppo.response_len} = "
                f"{cfg.model.context - cfg.ppo.response_len} at most)")
    return texts, ids


def target_token_id(cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> int | None:
    if cfg.ppo.reward != "target_token_fraction":
        return None
    ids = tok.encode(cfg.ppo.target_token)
    if len(ids) != 1:
        raise ConfigError(f"ppo.target_token={cfg.ppo.target_token!r} encodes to {len(ids)} "
                          "tokens; it must be exactly one")
    return ids[0]


def prompt_batch(prompts: Sequence[list[int]], idx: np.ndarray, cfg: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh) -> tuple[Array, Array]:
    """Left-padded prompts BxP and their padding B of the rows `idx`, sharded over data."""
    tokens, pad = sample.pad_prompts([prompts[i] for i in idx], cfg.ppo.max_prompt_len)
    lo, hi = loop.host_rows(len(idx))
    return (sharding.host_local_to_global(tokens[lo:hi], mesh),
            sharding.host_local_to_global(pad[lo:hi], mesh))


def iteration_rows(n_prompts: int, cfg: ml_collections.ConfigDict, it: int) -> np.ndarray:
    """Prompt indices of iteration `it`: positions [it * B, (it + 1) * B) of seeded
    per-epoch shuffles of the prompt file."""
    b = cfg.ppo.rollout_batch
    return data_lib.window_ids(n_prompts, cfg.data.seed, it * b, b)


def ptx_windows(corpus: data_lib.Corpus | None, cfg: ml_collections.ConfigDict, update: int,
                mesh: jax.sharding.Mesh) -> Array | None:
    """Update number `update`'s pretraining windows (ptx_batch_size x ptx_context + 1)."""
    if corpus is None:
        return None
    local = corpus.batch(seed=cfg.data.seed, step=update, global_batch=cfg.ppo.ptx_batch_size,
                         context=cfg.ppo.ptx_context, process_index=jax.process_index(),
                         process_count=jax.process_count())
    return sharding.host_local_to_global(local, mesh)


def gathered(x: Array) -> np.ndarray:
    """A global array as one numpy array on every host."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---------------------------------------------------------------------------- the task


def make_task(cfg: ml_collections.ConfigDict, value_cfg: ml_collections.ConfigDict,
              init_from: str, mesh: jax.sharding.Mesh, tok: tokenizer_lib.Tokenizer,
              prompts: list[list[int]], held_out: tuple[list[str], list[list[int]]] | None,
              corpus: data_lib.Corpus | None, target_id: int | None
              ) -> tuple[loop.Task, Callable[[Any, tuple], dict[str, float]]]:
    """PPO-ptx as a loop Task: one step = one iteration (rollout, score, updates); and
    `test(params, split)`, the test-split report, run after training on the same compiled
    steps (outside the loop, so nothing the loop chooses ever sees it)."""
    p = cfg.ppo
    coefs = {"kl_coef": jnp.float32(p.kl_coef), "ptx_coef": jnp.float32(p.ptx_coef),
             "missing_eot_penalty": jnp.float32(p.missing_eot_penalty)}
    frozen: dict = {}  # the SFT reference and the reward model, loaded once the run starts
    built: dict = {}
    lr = optim.learning_rate_schedule(optimizer_cfg(cfg))

    def init_params(rng: Array, shardings: Any) -> dict:
        del rng  # everything starts from trained runs
        policy = open_run(init_from, mesh, rules=cfg).params
        if p.reward == "model":
            value = reward.load(p.reward_workdir, mesh, cfg)[1]
        else:
            gpt = open_run(init_from, mesh, rules=cfg).params
            value = {"gpt": gpt, "head": {"kernel": jnp.zeros((value_cfg.d_model, 1)),
                                          "bias": jnp.zeros((1,))}}
        params = {"policy": policy, "value": value}
        if p.ema_decay:
            params["ema"] = policy
        copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)
        return copy(params)  # fresh buffers: the EMA must not alias the (donated) policy

    def steps_of() -> Steps:
        if not built:
            built["steps"] = build_steps(cfg, value_cfg, mesh, tok.vocab_size, tok.eot_id,
                                         target_id)
            frozen["ref"] = open_run(init_from, mesh, rules=cfg).params
            frozen["reward"] = (reward.load(p.reward_workdir, mesh, cfg)[1]
                                if target_id is None else None)
        return built["steps"]

    def make_step(trainer: loop.Trainer) -> Callable[[dict, int], tuple[dict, dict]]:
        del trainer  # the steps are built (and cached) from the config, on `mesh`
        s = steps_of()

        def iteration(state: dict, it: int) -> tuple[dict, dict]:
            tokens, pad = prompt_batch(prompts, iteration_rows(len(prompts), cfg, it), cfg, mesh)
            tokens_BxS, mask_BxA, ended_B = s.rollout(state["params"]["policy"], tokens, pad,
                                                      TRAIN_STREAM, it)
            judged = s.judge(state["params"]["policy"], frozen["ref"], frozen["reward"],
                             tokens_BxS, mask_BxA)
            exp, metrics = s.experience(state["params"], judged, tokens_BxS, mask_BxA, ended_B,
                                        coefs)
            per, updates = p.rollout_batch // p.minibatches, []
            for epoch in range(p.epochs):
                order = np.random.default_rng([cfg.seed, it, epoch]).permutation(p.rollout_batch)
                for m in range(p.minibatches):
                    n = (it * p.epochs + epoch) * p.minibatches + m
                    state, u = s.update(state, exp, jnp.asarray(order[m * per:(m + 1) * per]),
                                        ptx_windows(corpus, cfg, n, mesh), coefs)
                    updates.append(u)
            metrics.update({k: jnp.mean(jnp.stack([u[k] for u in updates])) for k in updates[0]})
            metrics["lr"] = lr((it + 1) * p.epochs * p.minibatches - 1)
            return {**state, "step": state["step"] + 1}, metrics

        return iteration

    def evaluate_policy(policy: Any, prefix: str, split: tuple[list[str], list[list[int]]]
                        ) -> dict[str, float]:
        texts, ids = split
        rows = np.repeat(np.arange(len(ids)), p.eval_samples)
        b, s = p.rollout_batch, steps_of()
        cols: dict[str, list] = {"score": [], "kl": [], "ended": [], "tokens": [], "mask": []}
        penalty = float(p.missing_eot_penalty)
        for c in range(math.ceil(len(rows) / b)):
            idx = rows[np.arange(c * b, (c + 1) * b) % len(rows)]  # the last chunk wraps
            tokens_BxS, mask_BxA, ended_B = s.rollout(policy, *prompt_batch(ids, idx, cfg, mesh),
                                                      EVAL_STREAM, c)
            j = s.judge(policy, frozen["ref"], frozen["reward"], tokens_BxS, mask_BxA)
            kl_B = ((j.logp_BxA - j.logp_ref_BxA) * mask_BxA).sum(1)
            for k, v in (("score", j.score_B), ("kl", kl_B), ("ended", ended_B),
                         ("tokens", tokens_BxS), ("mask", mask_BxA)):
                cols[k].append(gathered(v))
        n = len(rows)
        got = {k: np.concatenate(v)[:n] for k, v in cols.items()}
        responses = [tok.decode([t for t in row[1:][m > 0].tolist() if t != tok.eot_id])
                     for row, m in zip(got["tokens"], got["mask"])]
        objective = np.where(got["ended"], got["score"], got["score"] - penalty) \
            - p.kl_coef * got["kl"]  # what PPO maximises (InstructGPT eq. 2 without ptx)
        out = {"loss": -objective.mean(),
               "reward": got["score"].mean(), "kl": got["kl"].mean(), "kl_max": got["kl"].max(),
               "ended": got["ended"].mean(),
               "response_len": np.mean([len(r) for r in responses])}
        if p.eval_rule:
            rule = RULES[p.eval_rule]
            out["well_formed"] = np.mean([rule(texts[i], r) for i, r in zip(rows, responses)])
        if p.eval_target:
            out["target_count"] = np.mean([r.count(p.eval_target) for r in responses])
        return {f"{prefix}{k}": float(v) for k, v in out.items()}

    def evaluate(params: Any) -> dict[str, float]:
        if held_out is None:
            return {}
        with sharding.activation_sharding(mesh):  # as in training: the same compiled steps
            out = evaluate_policy(params["policy"], "eval_", held_out)
            if "ema" in params:
                out.update(evaluate_policy(params["ema"], "ema_eval_", held_out))
        return out

    def test(params: Any, split: tuple[list[str], list[list[int]]]) -> dict[str, float]:
        """The SFT policy, `params`' policy and its EMA on the test split."""
        steps_of()
        with sharding.activation_sharding(mesh):
            out = evaluate_policy(frozen["ref"], "sft_test_", split)
            out.update(evaluate_policy(params["policy"], "test_", split))
            if "ema" in params:
                out.update(evaluate_policy(params["ema"], "ema_test_", split))
        return out

    task = loop.Task(evaluate=evaluate,
                     boxed_params=boxed_params(cfg, value_cfg), init_params=init_params,
                     optimizer=per_key(optimizers(cfg)), make_step=make_step,
                     tokens_per_step=p.rollout_batch * p.response_len,
                     extra_meta={"init_from": init_from, "reward_workdir": p.reward_workdir})
    return task, test


def optimizer_cfg(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config whose schedule the policy's optimizer follows (in optimizer updates)."""
    out = cfg.copy_and_resolve_references()
    out.train.steps = num_updates(cfg)
    return out


# ---------------------------------------------------------------------------- the run


def train_ppo(cfg: ml_collections.ConfigDict, init_from: str, workdir: str) -> dict:
    """PPO(-ptx) from the SFT workdir `init_from` to `ppo.iterations`, resuming from
    `workdir`; returns the last iteration's metrics (and the last evaluation's)."""
    cfg, value_cfg = ppo_config(cfg, init_from)
    p = cfg.ppo
    tok = Workdir(init_from).tokenizer()
    if p.reward == "model":
        check_reward_workdir(cfg, init_from)
    mesh = sharding.make_mesh(cfg)
    for field, rows in (("ppo.rollout_batch", p.rollout_batch // p.minibatches),
                        ("ppo.ptx_batch_size", p.ptx_batch_size or mesh.shape["data"])):
        if rows % (mesh.shape["data"] * jax.process_count()):
            raise ConfigError(f"{field}: {rows} rows per update do not split over the data "
                              f"axis ({mesh.shape['data']}) and hosts")
    _, prompts = read_prompts(cfg, "prompts_jsonl", tok)
    held_out = read_prompts(cfg, "eval_prompts_jsonl", tok) if p.eval_prompts_jsonl else None
    test_split = read_prompts(cfg, "test_prompts_jsonl", tok) if p.test_prompts_jsonl else None
    target = target_token_id(cfg, tok)
    corpus = data_lib.prepare(cfg) if p.ptx_batch_size else None
    Workdir(workdir).save_tokenizer(tok)
    task, test = make_task(cfg, value_cfg, init_from, mesh, tok, prompts, held_out, corpus,
                           target)
    final, params, preempted = loop.run(cfg, workdir, mesh, task, **cli.run_options())
    if not preempted and test_split is not None:
        final.update(test(params, test_split))
        if jax.process_index() == 0:
            report = {k: v for k, v in final.items() if "test_" in k}
            (Workdir(workdir) / TEST_REPORT).write_text(json.dumps(
                {"test_prompts_jsonl": p.test_prompts_jsonl, "iterations": p.iterations,
                 **report}, indent=1))
    if not preempted:
        export_policy(cfg, params["policy"], tok, Workdir(workdir) / POLICY_DIR, p.iterations)
        if "ema" in params:
            export_policy(cfg, params["ema"], tok, Workdir(workdir) / EMA_POLICY_DIR,
                          p.iterations)
    if jax.process_index() == 0:
        print(f"{cfg.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()
                                           if k in ("reward", "kl", "ended", "eval_reward",
                                                    "eval_kl", "eval_ended",
                                                    "eval_well_formed", "eval_target_count",
                                                    "test_reward", "test_kl", "test_ended",
                                                    "test_well_formed",
                                                    "test_target_count")))
    return final


def export_policy(cfg: ml_collections.ConfigDict, params: Any, tok: tokenizer_lib.Tokenizer,
                  directory: Any, step: int) -> None:
    """The policy as a plain GPT workdir (config, tokenizer, one checkpoint with a fresh
    optimizer state, as `convert` imports have): for sampling, evaluation, or as another
    stage's `init_from`."""
    out = Workdir(directory)
    out.write_config(cfg)
    out.save_tokenizer(tok)
    ckpt = ckpt_lib.Checkpointer(out, keep=1, async_save=False)
    ckpt.save(step, params, jax.jit(optim.make_optimizer(cfg).init)(params), {"step": step},
              force=True)
    ckpt.close()


def main(argv: list[str]) -> None:
    del argv
    cli.start()
    train_ppo(flags.FLAGS.config, flags.FLAGS.init_from, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_run_flags("PPO config (experiments/rlhf/ppo.py).", init_from=True)
    cli.run(main)
