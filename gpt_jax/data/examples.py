"""Example batches: fine-tuning, SFT and the reward model hold small splits as arrays of
examples (one row each); `loop.microbatched` then slices a batch for this host."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from gpt_jax.config import ConfigError


def read_jsonl(path: str, required: Sequence[str]) -> list[dict]:
    """All objects of a JSONL file; each must have the `required` keys."""
    if not path:
        raise ConfigError(f"no JSONL file given for the {list(required)} data")
    from etils import epath
    rows = []
    try:
        text = epath.Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such JSONL file") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        missing = [k for k in required if k not in row] if isinstance(row, dict) else required
        if missing:
            raise ConfigError(f"{path}:{n}: missing {list(missing)}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no examples")
    return rows


def epoch_batch(arrays: dict[str, np.ndarray], *, seed: int, step: int,
                batch_size: int) -> dict[str, np.ndarray]:
    """Batch `step` of a seeded per-epoch shuffle: a pure function of (seed, step)."""
    n = len(next(iter(arrays.values())))
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ConfigError(f"train.batch_size={batch_size} exceeds the {n} training examples")
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[i * batch_size:(i + 1) * batch_size]
    return {k: v[idx] for k, v in arrays.items()}

