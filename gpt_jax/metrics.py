"""The metrics writer every trainer uses: `workdir/metrics.jsonl` and TensorBoard.

Only process 0 writes. Each line of metrics.jsonl is one JSON object with at
least `step`; training lines carry `loss`, eval lines `eval_loss`. Readers
(`gpt_jax.plot`, the notebooks) read this file and nothing else.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool = True) -> None:
        self.active = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl, local or gs:// (a resumed run's repeated steps:
    last wins; a line still being written is skipped)."""
    from etils import epath

    rows: dict[tuple, dict] = {}
    for line in (epath.Path(workdir) / METRICS_FILE).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run still writing
        rows[(row["step"], "eval_loss" in row)] = row
    return sorted(rows.values(), key=lambda r: r["step"])
