"""The metrics writer every trainer uses: `workdir/metrics.jsonl` and TensorBoard.

Only process 0 writes. Each line of metrics.jsonl is one JSON object with at
least `step`; training lines carry `loss`, eval lines `eval_loss`. Readers
(`gpt_jax.plot`, the notebooks) read this file and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax

from gpt_jax.workdir import METRICS_FILE, Workdir, WorkdirError


class MetricsWriter:
    """Appends rows to `metrics.jsonl` and TensorBoard (process 0 only).

    Locally each row is appended and flushed at once. A Cloud Storage object cannot be
    appended to, so on gs:// the file is rewritten whole, at most every `remote_flush_s`
    seconds and at every `flush()`; the loop flushes at each checkpoint, so the rows up to
    the last checkpoint are always in the bucket and a resumed run recomputes the rest.
    """

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True,
                 remote_flush_s: float = 10.0) -> None:
        self.active = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.active:
            return
        self._workdir = Workdir(workdir)
        self._path = self._workdir / METRICS_FILE
        self._workdir.path.mkdir(parents=True, exist_ok=True)
        self._remote_flush_s = remote_flush_s
        if self._workdir.remote:
            self._text = self._path.read_text() if self._path.exists() else ""
            self._last_flush, self._dirty = time.monotonic(), False
        else:
            self._file = self._path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # writes gs:// through google-cloud-storage
            self._tb = SummaryWriter(self._workdir.tensorboard)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        line = json.dumps(row) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._text, self._dirty = self._text + line, True
            if time.monotonic() - self._last_flush >= self._remote_flush_s:
                self._flush_remote()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def _flush_remote(self) -> None:
        if self._dirty:
            self._workdir.write_text(METRICS_FILE, self._text)
        self._last_flush, self._dirty = time.monotonic(), False

    def flush(self) -> None:
        """Makes every row written so far durable (metrics.jsonl and TensorBoard)."""
        if not self.active:
            return
        if self._file is not None:
            self._file.flush()
        else:
            self._flush_remote()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        self.active = False


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl, local or gs://: a row repeated by a resumed run
    (same step, same keys) keeps its last value; rows of one step with different keys
    (training, evaluation) are all kept; a line still being written is skipped."""
    rows: dict[tuple, dict] = {}
    try:
        text = Workdir(workdir).read_text(METRICS_FILE)
    except FileNotFoundError:
        raise WorkdirError(f"{Workdir(workdir) / METRICS_FILE} not found: no metrics logged "
                           "in this run yet") from None
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run still writing
        rows[(row["step"], tuple(sorted(row)))] = row  # a rerun step: same keys, last wins
    return sorted(rows.values(), key=lambda r: r["step"])
