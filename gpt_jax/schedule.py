"""`python -m gpt_jax.schedule --config=...`: a config's schedule before spending a pod on it.

    python -m gpt_jax.schedule --config=experiments/gpt3.py:175b \\
        [--tokens=375e6,12e9,260e9] [--points=10] [--out=schedule.png]

Prints the learning rate, the batch in sequences and tokens, and the cumulative tokens
consumed at step 0, at the first step reaching each `--tokens` mark (default: the config's
warmup, batch-ramp, decay and training lengths), at `--points` evenly spaced steps and at
the last step; `--out` plots the same against step. Everything comes from `gpt_jax.optim`,
the functions training uses, so what is printed is what a run does.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import ml_collections
import numpy as np

from gpt_jax import optim

SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_tokens(values: list[str]) -> list[float]:
    """'375e6', '4B', '260b', '1.5M' -> token counts; ValueError naming --tokens otherwise."""
    out = []
    for text in values:
        m = re.fullmatch(r"\s*([0-9.eE+-]+?)\s*([kKmMbBgGtT]?)\s*", text)
        try:
            value = float(m.group(1)) * SUFFIXES[m.group(2).lower()] if m else math.nan
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--tokens: {text!r} is not a number of tokens >= 0 "
                             "(e.g. 375e6 or 4B)")
        out.append(value)
    return out


def default_marks(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """The config's own token milestones, by name (only those it sets)."""
    o, marks = cfg.optim, {}
    for name, value in (("warmup", o.warmup_tokens), ("batch ramp", o.batch_ramp_tokens),
                        ("decay", o.decay_tokens), ("training", cfg.train.get("tokens", 0))):
        if value:
            marks[name] = float(value)
    return marks


def table(cfg: ml_collections.ConfigDict, steps_N: np.ndarray) -> dict[str, np.ndarray]:
    """lr, batch (sequences, tokens) and cumulative tokens before each step (the lr of
    step s is used by the update that consumes step s's batch)."""
    steps_N = np.asarray(steps_N, np.int64)
    micro_seq = cfg.train.batch_size // cfg.train.microbatches
    count_N = np.asarray(optim.microbatches_at(cfg, steps_N))
    return {"step": steps_N,
            "lr": np.asarray(optim.learning_rate_schedule(cfg)(steps_N), np.float64),
            "batch_seqs": count_N * micro_seq,
            "batch_tokens": count_N * optim.tokens_per_microbatch(cfg),
            "tokens": np.asarray(optim.tokens_consumed(cfg, steps_N), np.int64)}


def report(cfg: ml_collections.ConfigDict, marks: dict[str, float], points: int = 10
           ) -> tuple[str, dict[str, np.ndarray], dict[str, int]]:
    """(printable text, the rows' table, mark name -> first step reaching it)."""
    last = optim.total_steps(cfg)
    mark_steps = {name: optim.steps_for_tokens(cfg, v) for name, v in marks.items()}
    steps = {0, last, *mark_steps.values(),
             *np.linspace(0, last, points + 2).round().astype(int).tolist()[1:-1]}
    rows = table(cfg, np.array(sorted(steps)))
    names = {s: n for n, s in mark_steps.items()}
    lines = [f"{cfg.name}: full batch {cfg.train.batch_size:,} x {cfg.model.context:,} = "
             f"{optim.tokens_per_step(cfg):,} tokens in {cfg.train.microbatches} microbatches; "
             f"{last:,} steps, {optim.tokens_consumed(cfg, last):,} tokens"]
    for name, s in mark_steps.items():
        what = f"{marks[name]:,.0f} tokens" + ("" if name == f"{marks[name]:,.0f}"
                                               else f" ({name})")
        lines.append(f"  {what}: step {s:,}, "
                     f"{optim.tokens_consumed(cfg, s):,} tokens consumed before it")
    lines.append(f"{'step':>10} {'lr':>11} {'batch (seqs)':>13} {'batch (tokens)':>15} "
                 f"{'tokens before':>18}")
    for i, s in enumerate(rows["step"]):
        lines.append(f"{s:>10,} {rows['lr'][i]:>11.4e} {rows['batch_seqs'][i]:>13,} "
                     f"{rows['batch_tokens'][i]:>15,} {rows['tokens'][i]:>18,}"
                     + (f"  <- {names[int(s)]}" if int(s) in names else ""))
    return "\n".join(lines), rows, mark_steps


def plot(cfg: ml_collections.ConfigDict, mark_steps: dict[str, int], out: str,
         samples: int = 2000) -> None:
    """Three panels against step: learning rate, batch tokens, cumulative tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = optim.total_steps(cfg)
    steps = np.unique(np.concatenate([np.linspace(0, last, samples).round(),
                                      list(mark_steps.values())])).astype(np.int64)
    rows = table(cfg, steps)
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for ax, key, label in zip(axes, ("lr", "batch_tokens", "tokens"),
                              ("learning rate", "batch (tokens)", "tokens consumed")):
        ax.plot(rows["step"], rows[key])
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        for name, s in mark_steps.items():
            ax.axvline(s, color="grey", ls=":", lw=1)
            if key == "lr":
                ax.annotate(name, (s, 0), rotation=90, fontsize=8, va="bottom")
    axes[0].set_title(cfg.name)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    from absl import flags, logging

    from gpt_jax.config import ConfigError, validate
    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        cfg = validate(f.config)
        marks = ({f"{v:,.0f}": v for v in parse_tokens(f.tokens)} if f.tokens
                 else default_marks(cfg))
    except (ConfigError, ValueError) as e:
        raise SystemExit(str(e)) from None
    text, _, mark_steps = report(cfg, marks, f.points)
    print(text)
    if f.out:
        plot(cfg, mark_steps, f.out)
        print(f"plot: {f.out}", file=sys.stderr)


def define_flags() -> Any:
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_list("tokens", [], "Token counts to locate (375e6, 4B, ...); default: the "
                      "config's warmup, ramp, decay and training lengths.")
    flags.DEFINE_integer("points", 10, "Evenly spaced steps to print besides the marks.",
                         lower_bound=0)
    flags.DEFINE_string("out", None, "Write a plot (PNG) of the schedule here.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from gpt_jax import cli
    define_flags()
    cli.run(main)
