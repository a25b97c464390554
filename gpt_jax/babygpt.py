"""`python -m gpt_jax.babygpt`: a GPT as a finite-state Markov chain.

With vocabulary {0, 1} and context 3 a GPT is a function from the 8 possible
contexts (states) to P(next = 1 | state). We train experiments/babygpt.py on
every window of its sequence with the library's own model, optimizer and
train step, and print that table beside the sequence's empirical transition
frequencies; seen states move toward them, unseen ones keep the model's guess.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from gpt_jax import cli, optim, steps
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib


def windows(sequence: str, context: int) -> np.ndarray:
    """Every window of context + 1 tokens of a 0/1 string, shape N x (context + 1)."""
    ids = np.array([int(c) for c in sequence], np.int32)
    return np.stack([ids[i:i + context + 1] for i in range(len(ids) - context)])


def states(context: int) -> np.ndarray:
    """All 2^context binary contexts, in counting order (000, 001, ...)."""
    return np.array(list(itertools.product((0, 1), repeat=context)), np.int32)


def empirical(sequence: str, context: int) -> dict[tuple[int, ...], float]:
    """P(next = 1 | state) for each state that occurs in the sequence."""
    ones: dict[tuple[int, ...], list[int]] = {}
    for w in windows(sequence, context):
        ones.setdefault(tuple(int(t) for t in w[:-1]), []).append(int(w[-1]))
    return {s: float(np.mean(v)) for s, v in ones.items()}


def transition_probs(model_cfg: ml_collections.ConfigDict, params: Any) -> np.ndarray:
    """P(next = 1 | state) for all states: the model's prediction after the full context."""
    logits = model_lib.GPT(model_cfg).apply({"params": params}, states(model_cfg.context))
    return np.asarray(jax.nn.softmax(logits[:, -1], axis=-1)[:, 1])


def train(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(probs before, probs after, losses): full-batch training on every window."""
    cfg = config_lib.validate(cfg)
    params = model_lib.unbox(model_lib.init_params(cfg.model, jax.random.key(cfg.seed)))
    tx = optim.make_optimizer(cfg)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step_fn = jax.jit(steps.make_train_step(steps.lm_loss_fn(cfg.model), tx))
    batch = jnp.asarray(windows(cfg.data.sequence, cfg.model.context))[None]  # 1 microbatch
    before = transition_probs(cfg.model, params)
    losses = []
    for _ in range(cfg.train.steps):
        state, metrics = step_fn(state, batch, jax.random.key(cfg.seed), jnp.asarray(1))
        losses.append(float(metrics["loss"]))
    return before, transition_probs(cfg.model, state["params"]), losses


def table(cfg: ml_collections.ConfigDict, before: np.ndarray, after: np.ndarray) -> str:
    emp = empirical(cfg.data.sequence, cfg.model.context)
    lines = ["state  P(1) init  P(1) trained  empirical (count)"]
    counts: dict[tuple[int, ...], int] = {}
    for w in windows(cfg.data.sequence, cfg.model.context):
        key = tuple(int(t) for t in w[:-1])
        counts[key] = counts.get(key, 0) + 1
    for s, p0, p1 in zip(states(cfg.model.context), before, after):
        key = tuple(int(t) for t in s)
        seen = f"{emp[key]:.2f} ({counts[key]})" if key in emp else "unseen"
        lines.append(f"{''.join(map(str, key))}    {p0:10.3f}  {p1:12.3f}  {seen}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    cfg = flags.FLAGS.config
    before, after, losses = train(cfg)
    print(f"sequence {cfg.data.sequence}: loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"in {len(losses)} steps")
    print(table(cfg, before, after))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", "experiments/babygpt.py", "Baby GPT config.")
    cli.run(main)
