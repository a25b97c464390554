"""The goodput ledger: where a run's paid seconds went, across every attempt (restart).

A pod is paid for every second it is held, not only for training steps. The ledger splits
each attempt's wall time (from its process's start to the loop's return) into exclusive
categories, the way MaxText's goodput monitoring does (ml-goodput-measurement,
https://github.com/AI-Hypercomputer/ml-goodput-measurement: goodput = productive step time
/ total job time; badput buckets TPU_INITIALIZATION, TRAINING_PREP, PROGRAM_STARTUP,
DATA_LOADING, UNPRODUCTIVE_CHECKPOINT_SAVE_TIME / _RESTORE_TIME,
WASTED_PROGRESS_FROM_DISRUPTION, OTHER; MaxText's docs/guides/monitoring_and_debugging/
monitor_goodput.md):

    steps       the loop driving train steps (dispatch, waiting for results, logging):
                the productive time, the numerator of goodput
    startup     process start to the first step: imports, flags, data preparation, the
                lease, mesh, sharded init, metrics writer (their accelerator init and
                training preparation)
    compile     tracing, lowering and XLA compilation (or a persistent-cache load) of any
                jitted computation, on the loop's thread: the union of JAX's own
                `/jax/core/compile/*` time spans (jax.monitoring), nested traces counted
                once, taken out of whichever category they fell in (init, the first step,
                the first evaluation). Their PROGRAM_STARTUP; unlike its calculator, which
                charges the first step's whole excess over the ideal step time, the first
                step's other one-time costs (allocations, the first transfers) stay in steps
    restore     reading the checkpoint a resumed attempt starts from
    data        blocked on the prefetch iterator for the next batch
    eval        in-loop evaluation
    save        blocked in checkpoint saves (the asynchronous save's device-to-host copy,
                a wait for the previous save) and the final wait for the last one
    recomputed  step time of an earlier attempt spent on steps past the checkpoint the
                next attempt restored, so trained again (their WASTED_PROGRESS_FROM_DISRUPTION):
                that attempt's mean step time x those of its steps the ledger had recorded
    lost        a killed attempt's time after its last heartbeat: it died within one
                heartbeat (HEARTBEAT_S) of it, so that much is counted (an upper bound,
                limited by when the next attempt started; unless storage held the
                heartbeat's write for longer)

goodput = steps / (sum of all categories over all attempts); recomputed steps are not
productive. `recomputed_steps` counts the steps trained again: per resume, the last step
an earlier attempt reached (the ledger's record, or the last row of metrics.jsonl when
that is later) minus the step the resumed attempt restored.

Where it lives. `goodput.json` in the run directory (through `Workdir`, so etils.epath,
local or gs://, each write atomic), one record per attempt: its start, the last time it
was recorded, its first and last step, status and seconds by category. Process 0 rewrites
it on a background thread every HEARTBEAT_S seconds and at each checkpoint save (never
more than once a second, Cloud Storage's rate for one object), so a storage outage never
blocks a step, and once, synchronously, when the loop returns. The next attempt reads
it and settles the earlier ones (lost time, recomputed steps).

Not counted: the time between attempts when no process runs (a rescheduled job's wait),
whatever a command does after the loop returns (train.py's final full evaluation and
sample) and the interpreter's exit; and an attempt that died before the loop began
recording (before `resume`) leaves no record. A live attempt's heartbeat charges its
category in progress up to that moment, but not the compile time inside it that JAX has
not reported yet. An attempt that stops on an error is left open, like a killed one.
Within an attempt every second of its main thread is in exactly one category, so the
categories sum to its wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from gpt_jax.workdir import Workdir

GOODPUT_FILE = "goodput.json"
CATEGORIES = ("steps", "startup", "compile", "restore", "data", "eval", "save", "recomputed",
              "lost")
HEARTBEAT_S = 10.0
MIN_WRITE_GAP_S = 1.0  # Cloud Storage allows about one write per second to one object
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_IMPORTED = time.time()
_PROCESS_FREE_SINCE: list[float] = []  # when this process's last ledger closed


def process_start_time() -> float:
    """Wall-clock time this process began: Linux's /proc/self/stat start time against
    CLOCK_BOOTTIME (to 1/CLK_TCK s); elsewhere, when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf(
            "SC_CLK_TCK")
        return time.time() - max(age, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED


def attempt_start() -> float:
    """When this attempt began: the process's start, or, for a second run in one process,
    when the one before it closed its ledger."""
    return _PROCESS_FREE_SINCE[-1] if _PROCESS_FREE_SINCE else process_start_time()


@dataclasses.dataclass
class Attempt:
    """One process's run of the loop: wall-clock `start` and `last_seen` (when its seconds
    were last recorded), the steps [first_step, reached] whose time is in `steps`, and
    `status`: running (live, or killed and not yet settled), killed or ended."""

    start: float
    last_seen: float
    first_step: int = 0
    reached: int = 0
    status: str = "running"
    heartbeat_s: float = HEARTBEAT_S
    recomputed_steps: int = 0
    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))

    @classmethod
    def from_json(cls, d: dict) -> Attempt:
        a = cls(**{k: d[k] for k in ("start", "last_seen", "first_step", "reached", "status",
                                     "heartbeat_s", "recomputed_steps")})
        a.seconds.update({k: float(d["seconds"].get(k, 0.0)) for k in CATEGORIES})
        return a


def settle(attempts: list[Attempt], restored: int, logged: int, now: float) -> int:
    """Settles earlier attempts when a new one begins at `now` from step `restored`; the
    last step in metrics.jsonl (`logged`) belongs to the last of them. A killed one gets
    its lost time; steps any of them trained past `restored` are recomputed, their recorded
    share of its step time moved to `recomputed`. Returns the number of those steps."""
    total = 0
    for i, a in enumerate(attempts):
        if a.status == "running":  # killed: it died within one heartbeat of its last
            a.seconds["lost"] += max(0.0, min(a.heartbeat_s, now - a.last_seen))
            a.status = "killed"
        reach = max(a.reached, logged) if i == len(attempts) - 1 else a.reached
        wasted = max(0, reach - max(a.first_step, restored))
        if not wasted:
            continue
        recorded = max(0, a.reached - max(a.first_step, restored))
        trained = a.reached - a.first_step
        moved = a.seconds["steps"] * recorded / trained if trained > 0 else 0.0
        a.seconds["steps"] -= moved
        a.seconds["recomputed"] += moved
        a.recomputed_steps += wasted
        a.reached = max(a.first_step, min(a.reached, restored))
        total += wasted
    return total


def totals(attempts: list[Attempt]) -> dict[str, float]:
    """Seconds by category summed over attempts, with `wall_s`, `goodput` (steps / wall),
    `recomputed_steps` and `attempts`."""
    seconds = {k: sum(a.seconds[k] for a in attempts) for k in CATEGORIES}
    wall = sum(seconds.values())
    return {"goodput": seconds["steps"] / wall if wall > 0 else 0.0, "wall_s": wall,
            **{f"{k}_s": v for k, v in seconds.items()},
            "recomputed_steps": sum(a.recomputed_steps for a in attempts),
            "attempts": len(attempts)}


def describe(t: dict[str, float]) -> str:
    """One line: the goodput fraction, the wall time and each badput category."""
    wall = t["wall_s"]
    bad = ", ".join(f"{k} {t[f'{k}_s']:.1f} s" + (f" ({t['recomputed_steps']} steps)"
                                                  if k == "recomputed" else "")
                    for k in CATEGORIES[1:])
    return (f"goodput {100 * t['goodput']:.1f}% of {wall:,.1f} s over {t['attempts']} "
            f"attempt{'s' * (t['attempts'] != 1)}: steps {t['steps_s']:.1f} s; badput {bad}")


class Ledger:
    """The live attempt's accounting plus the run's earlier attempts (process 0 persists).

    Time goes to the category on top of a stack: `switch` sets its bottom (startup, then
    steps), `timer(category)` pushes one for a block. JAX's compile spans on this thread
    are moved out of the category they fell in into `compile`. `clock` (wall-clock
    seconds, the clock JAX stamps its spans with) and `start` are for tests.
    """

    def __init__(self, workdir: str | os.PathLike | Workdir | None,
                 heartbeat_s: float = HEARTBEAT_S, clock: Callable[[], float] = time.time,
                 start: float | None = None, listen: bool = True) -> None:
        self._workdir = None if workdir is None else Workdir(workdir)
        self._active = self._workdir is not None and jax.process_index() == 0
        self._clock, self._heartbeat_s = clock, heartbeat_s
        begun = attempt_start() if start is None else start
        self.attempt = Attempt(start=begun, last_seen=begun, heartbeat_s=heartbeat_s)
        self.history: list[Attempt] = []
        self._stack = ["startup"]
        self._since = begun
        self._compiled = self._compiled_at = 0.0  # union of compile spans; at `_since`
        self._spans: list[tuple[float, float]] = []
        self._lock, self._write_lock = threading.Lock(), threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self._closed = False
        self._main = threading.get_ident()
        self._listening = listen
        if listen:
            jax.monitoring.register_event_time_span_listener(self._on_span)

    # ---------------------------------------------------------------- accounting

    def _advance(self, now: float) -> None:
        """Charges the time since `_since` to the current category, less compile spans
        reported meanwhile (to `compile`). Holds `_lock`."""
        self._charge(self.attempt.seconds, now)
        self._since, self._compiled_at = now, self._compiled
        self.attempt.last_seen = now

    def _charge(self, seconds: dict[str, float], now: float) -> None:
        elapsed = max(0.0, now - self._since)
        compiled = min(max(0.0, self._compiled - self._compiled_at), elapsed)
        seconds[self._stack[-1]] += elapsed - compiled
        seconds["compile"] += compiled

    def switch(self, category: str) -> None:
        """From now on, time outside any `timer` goes to `category`."""
        with self._lock:
            self._advance(self._clock())
            self._stack[0] = _check(category)

    @contextlib.contextmanager
    def timer(self, category: str) -> Iterator[None]:
        """The block's time goes to `category` (less the compilation inside it)."""
        with self._lock:
            self._advance(self._clock())
            self._stack.append(_check(category))
        try:
            yield
        finally:
            with self._lock:
                self._advance(self._clock())
                self._stack.pop()

    def compile_span(self, start: float, end: float) -> None:
        """Adds one compilation span (wall-clock seconds) to the union of those seen: a
        span that encloses or overlaps the last ones (an outer trace reported after its
        inner ones) adds only what they did not cover."""
        with self._lock:
            lo, hi, covered = start, end, 0.0
            while self._spans and self._spans[-1][0] < hi and self._spans[-1][1] > lo:
                a, b = self._spans.pop()
                covered += b - a
                lo, hi = min(lo, a), max(hi, b)
            self._spans.append((lo, hi))
            del self._spans[:-64]
            self._compiled += (hi - lo) - covered

    def _on_span(self, event: str, start_time: float, end_time: float, **kwargs: Any) -> None:
        if event in COMPILE_EVENTS and threading.get_ident() == self._main:
            self.compile_span(start_time, end_time)

    def trained(self, step: int) -> None:
        """The loop has dispatched the train step that reaches `step`."""
        self.attempt.reached = step

    # ---------------------------------------------------------------- the run's ledger

    def resume(self, restored: int, logged: int) -> int:
        """Reads the earlier attempts, settles them against this one's restored step and
        the last step metrics.jsonl logged (before a resumed writer sets later rows aside),
        and starts the heartbeat. Returns the steps that will be trained again."""
        self.attempt.first_step = self.attempt.reached = restored
        if not self._active:
            return 0
        self.history = self._read()
        wasted = settle(self.history, restored, logged, self.attempt.start)
        if self._heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"goodput ledger {self._workdir}")
            self._thread.start()
        self.persist()
        return wasted

    def snapshot(self) -> list[Attempt]:
        """Every attempt so far, this one charged up to now (nothing is changed)."""
        with self._lock:
            now = self._clock()
            live = dataclasses.replace(self.attempt, seconds=dict(self.attempt.seconds))
            if not self._closed:  # charged up to now
                self._charge(live.seconds, now)
                live.last_seen = max(now, live.last_seen)
        return [*self.history, live]

    def fields(self) -> dict[str, float]:
        """The metrics row: `goodput` and `goodput/<category>_s`, `goodput/wall_s`,
        `goodput/recomputed_steps`, `goodput/attempts`."""
        t = totals(self.snapshot())
        return {"goodput": t["goodput"],
                **{f"goodput/{k}": v for k, v in t.items() if k != "goodput"}}

    def line(self) -> str:
        return describe(totals(self.snapshot()))

    def persist(self) -> None:
        """Asks the heartbeat thread to write the ledger now (it never blocks the loop)."""
        self._wake.set()

    def close(self) -> None:
        """Ends this attempt: charges it up to now and writes the ledger (synchronously);
        a write that fails is one warning line, never the run's failure."""
        if self._closed:
            return
        with self._lock:
            self._advance(self._clock())
            self.attempt.status = "ended"
            self._closed = True
        self.stop()
        if self._active:
            self.write()

    def stop(self) -> None:
        """Stops the heartbeat and the compile listener (an unclosed attempt stays open,
        as a killed one would)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a write stuck on storage: close() waits for it
            self._thread = None
        if self._listening:
            jax.monitoring.unregister_event_time_span_listener(self._on_span)
            self._listening = False
            _PROCESS_FREE_SINCE.append(self._clock())

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._heartbeat_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.write()
            self._stop.wait(MIN_WRITE_GAP_S)

    def write(self) -> None:
        """Writes the ledger now (the heartbeat's job; a failure is one warning line)."""
        with self._write_lock:
            attempts = self.snapshot()
            text = json.dumps({"version": 1,
                               "attempts": [dataclasses.asdict(a) for a in attempts]}, indent=1)
            try:
                self._workdir.write_text(GOODPUT_FILE, text)
                self._warned = False
            except Exception as e:  # noqa: BLE001 - the ledger is a report, not the run
                if not self._warned:
                    print(f"warning: goodput ledger not written ({e}); retried at the next "
                          "heartbeat", file=sys.stderr, flush=True)
                self._warned = True

    def _read(self) -> list[Attempt]:
        try:
            text = self._workdir.read_text(GOODPUT_FILE)
        except FileNotFoundError:
            return []
        try:
            return [Attempt.from_json(d) for d in json.loads(text)["attempts"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            print(f"warning: {self._workdir / GOODPUT_FILE} is not a readable goodput ledger "
                  f"({type(e).__name__}: {e}); starting a new one", file=sys.stderr, flush=True)
            return []


def read(workdir: str | os.PathLike | Workdir) -> list[Attempt]:
    """A run's attempts as goodput.json records them (raises FileNotFoundError if none)."""
    text = Workdir(workdir).read_text(GOODPUT_FILE)
    return [Attempt.from_json(d) for d in json.loads(text)["attempts"]]


def _check(category: str) -> str:
    if category not in CATEGORIES:
        raise ValueError(f"goodput category {category!r} is not one of {list(CATEGORIES)}")
    return category
