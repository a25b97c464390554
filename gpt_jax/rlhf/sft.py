"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

`python -m gpt_jax.rlhf.sft --config=experiments/rlhf/sft.py --init_from=runs/pre
--workdir=runs/sft`. Data: JSONL, one {"prompt": ..., "response": ...} per line
(`sft.train_jsonl`, `sft.val_jsonl`). Each example is one right-padded row
`prompt + response + eot` (common.py); the next-token loss counts only the response
tokens and the eot. The workdir is a plain GPT workdir (config, tokenizer, checkpoints
of the same params tree), so `gpt_jax.sample`, the reward model and PPO start from it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from gpt_jax import cli, loop, rlhf, sharding, steps
from gpt_jax import data as data_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.rlhf import common
from gpt_jax.workdir import Workdir, open_run

Array = jax.Array
REQUIRED = ("prompt", "response")


def encode_split(rows: list[dict], tok: tokenizer_lib.Tokenizer,
                 max_len: int) -> dict[str, np.ndarray]:
    """tokens NxT, mask NxT (response tokens + eot), last N for a list of SFT rows."""
    examples = [common.encode_example(tok.encode, tok.eot_id, r["prompt"], r["response"],
                                      max_len) for r in rows]
    return common.pad_examples(examples, max_len, tok.eot_id)


def response_nll(logits_BxTxV: Array, tokens_BxT: Array, mask_BxT: Array) -> tuple[Array, Array]:
    """(summed next-token loss over response tokens, their count): position t predicts t+1."""
    return steps.cross_entropy(logits_BxTxV[:, :-1], tokens_BxT[:, 1:], mask_BxT[:, 1:])


def loss_fn(model_cfg: ml_collections.ConfigDict) -> steps.LossFn:
    """Mean response-token cross-entropy of a microbatch (dropout when rng is given)."""
    net = model_lib.GPT(model_cfg)

    def loss(params: Any, batch: dict, rng: Array | None) -> tuple[Array, dict]:
        deterministic = rng is None
        logits = net.apply({"params": params}, batch["tokens"], deterministic,
                           rngs=None if deterministic else {"dropout": rng})
        total, count = response_nll(logits, batch["tokens"], batch["mask"])
        return total / jnp.maximum(count, 1.0), {}

    return loss


def make_task(cfg: ml_collections.ConfigDict, init_from: str, mesh: jax.sharding.Mesh,
              train_arrays: dict[str, np.ndarray], val_arrays: dict[str, np.ndarray]
              ) -> loop.Task:
    """The SFT Task: pretrained params in, response-only loss, epoch batches, val loss."""
    net = model_lib.GPT(cfg.model)

    def init_params(rng: Array, shardings: Any) -> Any:
        del rng, shardings  # the run's params, laid out by this config's rules on `mesh`
        return open_run(init_from, mesh, rules=cfg).params

    def batch(step: int) -> dict[str, np.ndarray]:
        full = data_lib.epoch_batch(train_arrays, seed=cfg.data.seed, step=step,
                                  batch_size=cfg.train.batch_size)
        return loop.microbatched({k: full[k] for k in ("tokens", "mask")},
                                   cfg.train.microbatches)

    @jax.jit
    def eval_sums(params: Any, b: dict, rows: Array) -> tuple[Array, Array]:
        logits = net.apply({"params": params}, b["tokens"])
        real_B = (jnp.arange(b["mask"].shape[0]) < rows)[:, None]
        return response_nll(logits, b["tokens"], b["mask"] * real_B)

    def evaluate(params: Any) -> dict[str, float]:
        total, count = 0.0, 0.0
        rows = cfg.train.batch_size // cfg.train.microbatches
        arrays = {k: val_arrays[k] for k in ("tokens", "mask")}
        for b, real in loop.eval_batches(arrays, rows, mesh):
            s, c = eval_sums(params, b, real)
            total, count = total + float(s), count + float(c)
        return {"eval_loss": total / max(count, 1.0)}

    return loop.Task(loss_fn=loss_fn(cfg.model), batch=batch, evaluate=evaluate,
                     init_params=init_params,
                     tokens_per_step=int(cfg.train.batch_size * cfg.sft.max_len),
                     extra_meta={"init_from": init_from})


def sft(cfg: ml_collections.ConfigDict, init_from: str, workdir: str) -> dict:
    """Fine-tunes the GPT of workdir `init_from` on the demonstrations; final metrics."""
    cfg = common.stage_config(cfg, init_from)
    tok = Workdir(init_from).tokenizer()
    rows = data_lib.read_jsonl(cfg.sft.train_jsonl, REQUIRED)
    train_rows, val_rows = common.train_val(rows, cfg.sft.val_jsonl, REQUIRED)
    cfg.train.steps = max(1, cfg.sft.epochs * (len(train_rows) // cfg.train.batch_size))
    cfg = rlhf.validate(cfg)
    mesh = sharding.make_mesh(cfg)
    sharding.check_batch(cfg, mesh)
    Workdir(workdir).save_tokenizer(tok)
    task = make_task(cfg, init_from, mesh, encode_split(train_rows, tok, cfg.sft.max_len),
                     encode_split(val_rows, tok, cfg.sft.max_len))
    final, _, _ = loop.run(cfg, workdir, mesh, task, **cli.run_options())
    if jax.process_index() == 0:
        print(f"{cfg.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()
                                           if k in ("loss", "eval_loss")))
    return final


def main(argv: list[str]) -> None:
    del argv
    cli.start()
    sft(flags.FLAGS.config, flags.FLAGS.init_from, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_run_flags("SFT config (experiments/rlhf/sft.py).", init_from=True)
    cli.run(main)
