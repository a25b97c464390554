"""`python -m gpt_jax.params --config=experiments/gpt3.py:175b`: parameter counts.

Shapes come from `jax.eval_shape`, so even 175B parameters cost no memory.
"""

from __future__ import annotations

import math
from collections import defaultdict

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from gpt_jax import cli, model
from gpt_jax import config as config_lib


def breakdown(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameter count per top-level module kind (embeddings, attention, mlp, norms)."""
    shapes = model.unbox(model.abstract_params(cfg.model))
    counts: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        keys = [getattr(p, "key", str(p)) for p in path]
        kind = next((k for k in keys if k in ("wte", "wpe", "attn", "mlp")), "layernorm")
        counts[kind] += math.prod(leaf.shape)
    return dict(counts)


def total(cfg: ml_collections.ConfigDict) -> int:
    return sum(breakdown(cfg).values())


def main(argv: list[str]) -> None:
    del argv
    cfg = config_lib.validate(flags.FLAGS.config)
    parts = breakdown(cfg)
    n = sum(parts.values())
    print(f"{cfg.name}: {n:,} parameters ({n / 1e6:,.1f}M)")
    for kind, count in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<10} {count:>16,}  {100 * count / n:5.1f}%")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    cli.run(main)
