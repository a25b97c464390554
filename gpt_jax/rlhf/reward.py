"""The reward model (InstructGPT step 2): a GPT with a scalar head, trained on rankings.

`python -m gpt_jax.rlhf.reward --config=experiments/rlhf/reward.py --init_from=runs/sft
--workdir=runs/rm`. Data: JSONL, one prompt per line with K ranked responses,

    {"prompt": "...", "responses": ["...", "...", ...], "ranking": [1, 0, 2, ...]}

`ranking[i]` is the rank of `responses[i]`: 0 is best, larger is worse, equal ranks are
ties (any integers work; only their order matters). 2 <= K <= `reward.max_k`.

Model: the GPT's final hidden state (after ln_f) goes through a linear head to one scalar
per position; the reward of `prompt + response + eot` is the scalar at its last token
(the eot). The params are {'gpt': GPT params, 'head': {kernel, bias}}; PPO's value model
is the same module read at every position, initialised from these params.

Loss: all comparisons of one prompt are ONE batch element: its K responses take K
forward passes (padded to max_k, padding masked), and with the untied pairs (w, l) of
the prompt, loss = -1/#pairs * sum log sigmoid(r_w - r_l); tied pairs are dropped and
not counted in #pairs (so with no ties #pairs = C(K, 2)). The batch loss is the mean over
its prompts that have at least one untied pair. Evaluation reports this loss and the
accuracy over all held-out untied pairs (r_w > r_l).

Normalisation: after training the mean reward of the demonstrations is measured
(`reward.demo_jsonl`, SFT format, or if empty the top-ranked responses, ties at the top
included, of the training prompts) and its negation stored as `offset` in
`<workdir>/reward_offset.json`. `load` adds it to the head bias, so the reward PPO sees
(and the value model starts from) scores demonstrations at mean 0.
"""

from __future__ import annotations

import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from gpt_jax import cli, loop, rlhf, sharding, steps
from gpt_jax import data as data_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.config import ConfigError
from gpt_jax.rlhf import common
from gpt_jax.workdir import REWARD_OFFSET_FILE, Workdir, WorkdirError, open_run

Array = jax.Array
REQUIRED = ("prompt", "responses", "ranking")


class ScalarModel(nn.Module):
    """GPT (params under `gpt`) + linear head (`head`): one float32 scalar per position, BxT."""

    model_cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, tokens_BxT: Array, deterministic: bool = True) -> Array:
        h_BxTxD = model_lib.GPT(self.model_cfg, name="gpt")(tokens_BxT, deterministic,
                                                             return_hidden=True)
        d = self.model_cfg.d_model  # head init std 1/sqrt(D + 1), as lm-human-preferences
        head = nn.Dense(1, name="head", dtype=jnp.float32, kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal((d + 1) ** -0.5), ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))
        return head(h_BxTxD.astype(jnp.float32))[..., 0]


def abstract_params(model_cfg: ml_collections.ConfigDict) -> Any:
    """Boxed abstract params of a ScalarModel (shapes and logical axes, nothing allocated)."""
    tokens = jnp.zeros((1, min(model_cfg.context, 8)), jnp.int32)
    return jax.eval_shape(lambda r: ScalarModel(model_cfg).init(r, tokens),
                          jax.random.key(0))["params"]


def scores_at(values_BxT: Array, last_B: Array) -> Array:
    """Each row's scalar at its index `last_B`."""
    return jnp.take_along_axis(values_BxT, last_B[:, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------- the loss


def pairwise_terms(r_NxK: Array, rank_NxK: Array, valid_NxK: Array
                   ) -> tuple[Array, Array, Array]:
    """Per prompt: (mean -log sigmoid(r_w - r_l) over its untied pairs, #untied pairs,
    #pairs ranked correctly). Pair (i, j) counts when both are real and rank_i < rank_j."""
    valid = valid_NxK.astype(bool)
    better_NxKxK = ((rank_NxK[:, :, None] < rank_NxK[:, None, :])
                    & valid[:, :, None] & valid[:, None, :])
    diff_NxKxK = r_NxK[:, :, None] - r_NxK[:, None, :]
    pairs_N = better_NxKxK.sum(axis=(1, 2)).astype(jnp.float32)
    nll_N = -jnp.where(better_NxKxK, jax.nn.log_sigmoid(diff_NxKxK), 0.0).sum(axis=(1, 2))
    correct_N = (better_NxKxK & (diff_NxKxK > 0)).sum(axis=(1, 2)).astype(jnp.float32)
    return nll_N / jnp.maximum(pairs_N, 1.0), pairs_N, correct_N


def pairwise_loss(r_NxK: Array, rank_NxK: Array, valid_NxK: Array) -> Array:
    """-1/#pairs sum log sigmoid(r_w - r_l) per prompt, averaged over prompts with pairs."""
    loss_N, pairs_N, _ = pairwise_terms(r_NxK, rank_NxK, valid_NxK)
    has_N = (pairs_N > 0).astype(jnp.float32)
    return (loss_N * has_N).sum() / jnp.maximum(has_N.sum(), 1.0)


def rewards_NxK(net: ScalarModel, params: Any, batch: dict, deterministic: bool = True,
                rngs: dict | None = None) -> Array:
    """One forward pass per response: N x K rewards (padding slots included)."""
    n, k, t = batch["tokens"].shape
    values = net.apply({"params": params}, batch["tokens"].reshape(n * k, t), deterministic,
                       rngs=rngs)
    return scores_at(values, batch["last"].reshape(n * k)).reshape(n, k)


def loss_fn(model_cfg: ml_collections.ConfigDict) -> steps.LossFn:
    net = ScalarModel(model_cfg)

    def loss(params: Any, batch: dict, rng: Array | None) -> tuple[Array, dict]:
        deterministic = rng is None
        r = rewards_NxK(net, params, batch, deterministic,
                        None if deterministic else {"dropout": rng})
        return pairwise_loss(r, batch["rank"], batch["valid"]), {}

    return loss


# ---------------------------------------------------------------------------- data


def encode_rankings(rows: list[dict], tok: tokenizer_lib.Tokenizer, max_len: int,
                    max_k: int) -> dict[str, np.ndarray]:
    """tokens NxKxT, last NxK, valid NxK (real responses), rank NxK for ranking rows."""
    n = len(rows)
    out = {"tokens": np.full((n, max_k, max_len), tok.eot_id, np.int32),
           "last": np.zeros((n, max_k), np.int32), "valid": np.zeros((n, max_k), np.float32),
           "rank": np.zeros((n, max_k), np.int32)}
    for i, row in enumerate(rows):
        k = len(row["responses"])
        if not 2 <= k <= max_k or len(row["ranking"]) != k:
            raise ValueError(f"prompt {i}: {k} responses and {len(row['ranking'])} ranks; "
                             f"need 2 <= K <= reward.max_k={max_k}, one rank per response")
        examples = [common.encode_example(tok.encode, tok.eot_id, row["prompt"], resp, max_len)
                    for resp in row["responses"]]
        padded = common.pad_examples(examples, max_len, tok.eot_id)
        out["tokens"][i, :k], out["last"][i, :k] = padded["tokens"], padded["last"]
        out["valid"][i, :k] = 1.0
        out["rank"][i, :k] = row["ranking"]
    return out


def check_rankings(rows: list[dict], field: str, path: str, max_k: int) -> None:
    """One line naming the file and the prompt when a row cannot be ranked: fewer than 2 or
    more than reward.max_k responses, or not one rank per response."""
    for n, row in enumerate(rows, 1):
        k, ranks = len(row["responses"]), len(row["ranking"])
        if not 2 <= k <= max_k or ranks != k:
            raise ConfigError(f"reward.{field}={path!r}: prompt {n} has {k} "
                              f"response{'s' * (k != 1)} and {ranks} rank{'s' * (ranks != 1)}; "
                              f"need 2 <= K <= reward.max_k={max_k}, one rank per response")


def demonstrations(cfg: ml_collections.ConfigDict, train_rows: list[dict]
                   ) -> tuple[list[tuple[str, str]], str]:
    """(prompt, response) pairs that define reward 0, and a description of them."""
    if cfg.reward.demo_jsonl:
        rows = data_lib.read_jsonl(cfg.reward.demo_jsonl, ("prompt", "response"))
        return [(r["prompt"], r["response"]) for r in rows], cfg.reward.demo_jsonl
    demos = []
    for row in train_rows:
        best = min(row["ranking"])
        demos += [(row["prompt"], resp) for resp, rank in zip(row["responses"], row["ranking"])
                  if rank == best]
    return demos, "top-ranked responses of reward.train_jsonl"


def mean_reward(model_cfg: ml_collections.ConfigDict, params: Any, arrays: dict,
                rows: int, mesh: jax.sharding.Mesh) -> float:
    """Mean reward of right-padded single sequences (tokens NxT, last N)."""
    net = ScalarModel(model_cfg)
    score = jax.jit(lambda p, b: scores_at(net.apply({"params": p}, b["tokens"]), b["last"]))
    total, n = 0.0, 0
    for b, real in loop.eval_batches({k: arrays[k] for k in ("tokens", "last")}, rows,
                                     mesh):
        total += float(np.asarray(jax.device_get(score(params, b)))[:real].sum())
        n += real
    return total / max(n, 1)


def load(workdir: str, mesh: jax.sharding.Mesh, cfg: ml_collections.ConfigDict
         ) -> tuple[ml_collections.ConfigDict, Any]:
    """(model config, params) of a reward-model workdir on `mesh`, the demonstration
    offset of reward_offset.json added to the head bias (the reward PPO optimises)."""
    run = open_run(workdir, mesh, rules=cfg, boxed=abstract_params)
    if not run.workdir.exists(REWARD_OFFSET_FILE):
        raise WorkdirError(f"{run.workdir / REWARD_OFFSET_FILE} not found: the reward-model run "
                           "did not finish (rerun it to write the demonstration offset)")
    offset = float(json.loads(run.workdir.read_text(REWARD_OFFSET_FILE))["offset"])
    model_cfg, params = run.cfg.model, run.params
    head = {**params["head"], "bias": params["head"]["bias"] + offset}
    return model_cfg, {**params, "head": head}


# ---------------------------------------------------------------------------- the run


def make_task(cfg: ml_collections.ConfigDict, init_from: str, mesh: jax.sharding.Mesh,
              train_arrays: dict[str, np.ndarray], val_arrays: dict[str, np.ndarray]
              ) -> loop.Task:
    """The RM Task: GPT from `init_from` + a fresh head, pairwise loss, pair accuracy."""
    net = ScalarModel(cfg.model)
    boxed = abstract_params(cfg.model)

    def init_params(rng: Array, shardings: Any) -> Any:
        gpt = open_run(init_from, mesh, rules=cfg).params
        build = lambda gpt, rng: {  # noqa: E731
            "gpt": gpt, "head": model_lib.unbox(ScalarModel(cfg.model).init(
                rng, jnp.zeros((1, 1), jnp.int32)))["params"]["head"]}
        return jax.jit(build, out_shardings=shardings)(gpt, rng)

    def batch(step: int) -> dict[str, np.ndarray]:
        full = data_lib.epoch_batch(train_arrays, seed=cfg.data.seed, step=step,
                                  batch_size=cfg.train.batch_size)
        return loop.microbatched(full, cfg.train.microbatches)

    @jax.jit
    def eval_sums(params: Any, b: dict, rows: Array) -> Array:
        loss_N, pairs_N, correct_N = pairwise_terms(rewards_NxK(net, params, b), b["rank"],
                                                    b["valid"])
        real_N = jnp.arange(loss_N.shape[0]) < rows
        has_N = real_N & (pairs_N > 0)
        return jnp.stack([jnp.where(has_N, loss_N, 0.0).sum(), has_N.sum(),
                          jnp.where(real_N, correct_N, 0.0).sum(),
                          jnp.where(real_N, pairs_N, 0.0).sum()])

    def evaluate(params: Any) -> dict[str, float]:
        sums = np.zeros(4)
        for b, real in loop.eval_batches(val_arrays, cfg.train.batch_size
                                         // cfg.train.microbatches, mesh):
            sums += np.asarray(jax.device_get(eval_sums(params, b, real)))
        return {"eval_loss": float(sums[0] / max(sums[1], 1.0)),
                "accuracy": float(sums[2] / max(sums[3], 1.0))}

    k, t = train_arrays["tokens"].shape[1:]
    return loop.Task(loss_fn=loss_fn(cfg.model), batch=batch, evaluate=evaluate,
                     boxed_params=boxed, init_params=init_params,
                     tokens_per_step=int(cfg.train.batch_size * k * t),
                     extra_meta={"init_from": init_from})


def train_reward(cfg: ml_collections.ConfigDict, init_from: str, workdir: str) -> dict:
    """Trains the RM from the GPT of workdir `init_from`, then writes the demonstration
    offset (reward_offset.json); returns final metrics with `offset`."""
    cfg = common.stage_config(cfg, init_from)
    tok = Workdir(init_from).tokenizer()
    r = cfg.reward
    rows = data_lib.read_jsonl(r.train_jsonl, REQUIRED)
    check_rankings(rows, "train_jsonl", r.train_jsonl, r.max_k)
    train_rows, val_rows = common.train_val(rows, r.val_jsonl, REQUIRED)
    if r.val_jsonl:
        check_rankings(val_rows, "val_jsonl", r.val_jsonl, r.max_k)
    cfg.train.steps = max(1, r.epochs * (len(train_rows) // cfg.train.batch_size))
    cfg = rlhf.validate(cfg)
    mesh = sharding.make_mesh(cfg)
    sharding.check_batch(cfg, mesh)
    Workdir(workdir).save_tokenizer(tok)
    encode = lambda rows: encode_rankings(rows, tok, r.max_len, r.max_k)  # noqa: E731
    task = make_task(cfg, init_from, mesh, encode(train_rows), encode(val_rows))
    final, params, _ = loop.run(cfg, workdir, mesh, task, **cli.run_options())

    demos, source = demonstrations(cfg, train_rows)
    demo_arrays = common.pad_examples(
        [common.encode_example(tok.encode, tok.eot_id, p, resp, r.max_len) for p, resp in demos],
        r.max_len, tok.eot_id)
    mean = mean_reward(cfg.model, params, demo_arrays,
                       cfg.train.batch_size // cfg.train.microbatches, mesh)
    if jax.process_index() == 0:
        Workdir(workdir).write_text(REWARD_OFFSET_FILE, json.dumps(
            {"offset": -mean, "demo_mean_reward": mean, "num_demos": len(demos),
             "demos": source}, indent=2))
        shown = {k: round(v, 4) for k, v in final.items() if k in ("loss", "eval_loss",
                                                                    "accuracy")}
        print(f"{cfg.name}: {shown}; demonstrations' mean reward {mean:.4f} -> offset "
              f"{-mean:.4f}")
    return {**final, "offset": -mean}


def main(argv: list[str]) -> None:
    del argv
    cli.start()
    train_reward(flags.FLAGS.config, flags.FLAGS.init_from, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_run_flags("Reward-model config (experiments/rlhf/reward.py).", init_from=True)
    cli.run(main)
