"""The metrics writer every trainer uses: `workdir/metrics.jsonl` and TensorBoard.

Only process 0 writes. Each line of metrics.jsonl is one JSON object with at
least `step`; training lines carry `loss`, eval lines `eval_loss`, the goodput ledger's
lines (`gpt_jax.goodput`, at each evaluation and at the end) `goodput`. Readers
(`gpt_jax.plot`, the notebooks) read it through `read_metrics`.

Integrity. A kill mid-write can leave a partial last line: the writer drops it when it
opens the file (one warning line), and a reader recovers any whole row that was appended
onto such a fragment. A resumed run sets aside the rows it will write again (those past
the step it restored, all of them when it starts over) into `metrics.jsonl.after-<step>`,
so each step is logged once. On gs://, where an object cannot be appended to, a live run
writes its rows as numbered segment objects `metrics.jsonl.d/<n>.jsonl` (each flush
writes only the rows since the last one; every CHUNK segments are rewritten as one
`<first>-<last>.jsonl`, so readers make CHUNK times fewer requests) that readers
concatenate after `metrics.jsonl`; opening and closing the writer fold them into
`metrics.jsonl`.

Outages. On gs:// the writes (segments, chunks, their deletion, TensorBoard's uploads) run
on a background thread (`storage.Background`), in order, each retried until the store
answers: training goes on through an outage, and since every write names its object a
retry rewrites the same object, so no row is dropped or written twice. `close()` waits
for them for up to the run's storage retry budget.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
from etils import epath

from gpt_jax import storage
from gpt_jax.workdir import (
    METRICS_FILE,
    Workdir,
    WorkdirError,
    atomic_write_bytes,
    describe_error,
)

SEGMENTS_DIR = METRICS_FILE + ".d"  # gs:// only: a live run's rows since it opened
CHUNK = 64  # every CHUNK segments become one object `<first>-<last>.jsonl`
_STEP = '{"step"'  # how every row starts (the writer puts `step` first)


class MetricsWriter:
    """Appends rows to `metrics.jsonl` and TensorBoard (process 0 only).

    `resume_step`: the step this run starts from; rows of an earlier attempt past it (all
    of them at 0) are set aside first, and TensorBoard hides its events from then on.
    None keeps every row. Locally each row is appended and flushed at once. On gs:// the
    rows since the last flush go into one new segment object, at most every
    `remote_flush_s` seconds and at every `flush()`; the loop flushes at each checkpoint,
    so the rows up to the last checkpoint are always in the bucket.
    """

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True,
                 remote_flush_s: float = 10.0, resume_step: int | None = None) -> None:
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
            self._segment = _fold_segments(self._workdir, resume_step)
            self._pending: list[str] = []
            self._unchunked: list[str] = []  # the segments' rows since the last chunk
            self._last_flush = time.monotonic()
            self._background = storage.Background(f"metrics writer {self._workdir}")
        else:
            _repair_local(self._workdir, resume_step)
            self._file = self._path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # writes gs:// through google-cloud-storage
            purge = None if resume_step is None else resume_step + (resume_step > 0)
            # On gs:// its uploads happen at flush(), on the background thread, retried;
            # its own thread would die on the first failed upload and drop what follows.
            flush_secs = 2_000_000 if self._workdir.remote else 120  # < 2**31 ms
            self._tb = SummaryWriter(self._workdir.tensorboard, purge_step=purge,
                                     flush_secs=flush_secs)

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
            self._pending.append(line)
            if time.monotonic() - self._last_flush >= self._remote_flush_s:
                self._flush_remote()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def _flush_remote(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._put(f"{SEGMENTS_DIR}/{self._segment:06d}.jsonl", text)
            self._unchunked.append(text)
            self._segment += 1
            self._pending = []
            if len(self._unchunked) == CHUNK:  # one object for the last CHUNK segments
                first = self._segment - CHUNK
                self._put(f"{SEGMENTS_DIR}/{first:06d}-{self._segment - 1:06d}.jsonl",
                          "".join(self._unchunked))
                self._unchunked = []
                # readers skip segments a chunk holds; the next open deletes leftovers
                covered = [self._workdir / SEGMENTS_DIR / f"{i:06d}.jsonl"
                           for i in range(first, self._segment)]
                self._background.put(f"deleting {len(covered)} metrics segments",
                                     lambda: _delete(covered))
        self._last_flush = time.monotonic()

    def _put(self, name: str, text: str) -> None:
        """Writes object `name` of the workdir on the background thread (retried)."""
        path, data = self._workdir / name, text.encode()
        self._background.put(f"metrics write of {path}", lambda: atomic_write_bytes(path, data))

    def flush(self, wait: bool = True) -> None:
        """Makes every row written so far durable (metrics.jsonl and TensorBoard). On gs://
        `wait=False` only queues the writes (the training loop: an outage must not stop
        it); otherwise this waits for them, up to the storage retry budget."""
        if not self.active:
            return
        if self._file is not None:
            self._file.flush()
        else:
            self._flush_remote()
        if self._tb is not None:
            if self._file is None:
                self._background.put(f"TensorBoard events in {self._workdir.tensorboard}",
                                     self._tb.flush)
            else:
                self._tb.flush()
        if self._file is None and wait:
            self._background.drain(storage.budget())

    def close(self) -> None:
        """Flushes; on gs:// also folds the run's segments into metrics.jsonl (once: a
        failure leaves the segments, which readers still read)."""
        if not self.active:
            return
        self.flush(wait=False)
        written = True
        if self._file is not None:
            self._file.close()
        elif not self._background.close(storage.budget()):
            written = False
            print(f"warning: {self._background.pending} metrics writes to {self._workdir} did "
                  f"not complete within train.storage_retry_budget_s={storage.budget():g} s "
                  "(storage unreachable); the rows since the last one that did are lost",
                  file=sys.stderr, flush=True)
        else:
            try:
                _fold_segments(self._workdir, None)
            except WorkdirError as e:
                print(f"warning: {e}; its rows stay in {self._workdir / SEGMENTS_DIR}",
                      file=sys.stderr, flush=True)
        if self._tb is not None and written:
            try:
                self._tb.close()
            except Exception as e:  # noqa: BLE001 - TensorBoard is a copy of metrics.jsonl
                print(f"warning: TensorBoard events in {self._workdir.tensorboard}: "
                      f"{storage.cause(e)}", file=sys.stderr, flush=True)
        self.active = False


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def parse_rows(text: str) -> tuple[list[tuple[str, dict]], str]:
    """(line text, row) of every whole row in `text`, and its trailing partial line ('' if
    none). A row written onto the fragment a kill left is recovered, the fragment dropped."""
    partial = ""
    if text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        text, partial = text[:cut], text[cut:]
    rows, decoder = [], json.JSONDecoder()
    for line in text.splitlines():
        at = 0 if line.startswith(_STEP) else line.find(_STEP)
        while at >= 0:
            try:
                row, end = decoder.raw_decode(line, at)
            except json.JSONDecodeError:
                at = line.find(_STEP, at + 1)
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append((line[at:end], row))
            at = line.find(_STEP, end)
    if partial:
        try:  # a whole row whose newline was cut off
            row = json.loads(partial)
            rows.append((partial, row))
            partial = ""
        except json.JSONDecodeError:
            pass
    return rows, partial


def _split(rows: list[tuple[str, dict]], resume_step: int | None,
           ) -> tuple[list[str], list[str]]:
    """(lines kept, lines set aside) for a run that resumes at `resume_step`."""
    if resume_step is None:
        return [t for t, _ in rows], []
    past = (lambda s: True) if resume_step == 0 else (lambda s: s > resume_step)
    kept = [t for t, r in rows if not past(r["step"])]
    return kept, [t for t, r in rows if past(r["step"])]


def _set_aside(workdir: Workdir, lines: list[str], resume_step: int) -> None:
    """Appends `lines` to metrics.jsonl.after-<step>, with one line saying so."""
    name = f"{METRICS_FILE}.after-{resume_step}"
    try:
        old = workdir.read_text(name)
    except FileNotFoundError:
        old = ""
    workdir.write_text(name, old + "".join(t + "\n" for t in lines))
    what = "all of them: the run starts over" if resume_step == 0 else \
        f"past step {resume_step}, which this run resumes from"
    print(f"warning: set aside {len(lines)} rows of {workdir / METRICS_FILE} ({what}) into "
          f"{workdir / name}", file=sys.stderr, flush=True)


def _repair_local(workdir: Workdir, resume_step: int | None) -> None:
    """Drops a trailing partial line (one warning) and sets aside the rows the run will
    write again; rewrites metrics.jsonl atomically only if anything changed."""
    path = workdir / METRICS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    rows, partial = parse_rows(text)
    kept, aside = _split(rows, resume_step)
    if partial:
        print(f"warning: {path} ended in a partial line ({len(partial)} bytes, a write cut "
              "off by a kill); dropped it", file=sys.stderr, flush=True)
    if aside:
        _set_aside(workdir, aside, resume_step)
    body = "".join(t + "\n" for t in kept)
    if body != text:
        workdir.write_text(METRICS_FILE, body)


def _span(path: epath.Path) -> tuple[int, int] | None:
    """(first, last) segment of `<n>.jsonl` or `<first>-<last>.jsonl`; None for others."""
    ends = path.name.split(".")[0].split("-")
    if len(ends) > 2 or not all(e.isdigit() for e in ends):
        return None
    return int(ends[0]), int(ends[-1])


def _segments(workdir: Workdir, covered: bool = False) -> list[epath.Path]:
    """The segment and chunk objects of a gs:// run, in order; a segment that a chunk
    already holds (its deletion failed or is under way) is left out unless `covered`."""
    directory = workdir / SEGMENTS_DIR
    try:
        spans = {p: _span(p) for p in directory.iterdir()}
    except FileNotFoundError:
        return []
    spans = {p: s for p, s in spans.items() if s is not None}
    chunks = [s for s in spans.values() if s[0] != s[1]]
    return sorted((p for p, s in spans.items()
                   if covered or not any(c != s and c[0] <= s[0] and s[1] <= c[1]
                                         for c in chunks)),
                  key=lambda p: spans[p])


def _fs() -> Any:
    """gcsfs, the client epath serves gs:// with, for its batched reads and deletes."""
    import fsspec  # gs:// runs only
    return fsspec.filesystem("gs")


def _delete(paths: list[epath.Path]) -> None:
    """Deletes gs:// objects in batches (one request per hundred)."""
    if paths:
        try:
            _fs().rm([os.fspath(p) for p in paths])
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise WorkdirError(describe_error(paths[0], e)) from e


def _read_all(workdir: Workdir) -> tuple[str, list[epath.Path]]:
    """metrics.jsonl followed by every segment (read concurrently), and the segments.
    Raises FileNotFoundError when there is neither."""
    segments = _segments(workdir)
    try:
        head = workdir.read_text(METRICS_FILE)
    except FileNotFoundError:
        if not segments:
            raise
        head = ""
    try:
        fs = _fs() if segments else None
        names = [os.fspath(p) for p in segments]
        data = fs.cat(names, on_error="raise") if segments else {}
        texts = [data[n.split("://", 1)[1]].decode() for n in names]
    except FileNotFoundError:  # folded or chunked by the writer meanwhile: read again
        return _read_all(workdir)
    except Exception as e:  # noqa: BLE001 - any client's failure becomes one line
        raise WorkdirError(describe_error(workdir / SEGMENTS_DIR, e)) from e
    return head + "".join(texts), segments


def _fold_segments(workdir: Workdir, resume_step: int | None) -> int:
    """gs://: folds metrics.jsonl and its segments into metrics.jsonl (setting aside the
    rows past `resume_step`), deletes the segments; the next segment's number."""
    try:
        text, segments = _read_all(workdir)
    except FileNotFoundError:
        return 0
    rows, _ = parse_rows(text)
    kept, aside = _split(rows, resume_step)
    if aside:
        _set_aside(workdir, aside, resume_step)
    if segments or aside:
        workdir.write_text(METRICS_FILE, "".join(t + "\n" for t in kept))
    everything = _segments(workdir, covered=True)
    _delete(everything)
    return max(_span(p)[1] for p in everything) + 1 if everything else 0


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a run's metrics (metrics.jsonl, then a live gs:// run's segments): a row
    repeated by a resumed run (same step, same keys) keeps its last value; rows of one
    step with different keys (training, evaluation) are all kept; a line still being
    written is skipped, and a row written onto a fragment is recovered."""
    workdir = Workdir(workdir)
    try:
        text, _ = _read_all(workdir)
    except FileNotFoundError:
        raise WorkdirError(f"{workdir / METRICS_FILE} not found: no metrics logged "
                           "in this run yet") from None
    rows: dict[tuple, dict] = {}
    for _, row in parse_rows(text)[0]:
        rows[(row["step"], tuple(sorted(row)))] = row  # a rerun step: same keys, last wins
    return sorted(rows.values(), key=lambda r: r["step"])


def last_step(workdir: str | os.PathLike) -> int:
    """The largest step a run's metrics log (0 when it has none)."""
    try:
        text, _ = _read_all(Workdir(workdir))
    except FileNotFoundError:
        return 0
    return max((r["step"] for _, r in parse_rows(text)[0]), default=0)
