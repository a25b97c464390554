"""Riding out Cloud Storage outages: a deadline on every request, bounded retries with
backoff, and a background queue for the writes that training does not depend on.

Cloud Storage has blips of seconds to minutes and a pod run lasts days, so a run must not
die on one (README, "Reliability"). Three pieces:

- Deadlines. `configure_clients` gives every gcsfs request a timeout (`REQUEST_TIMEOUT_S`:
  a server that accepts a connection and never answers, as a paused one does, fails the
  request instead of hanging it) and makes gcsfs treat a prefix that holds nothing as an
  empty listing, as Cloud Storage itself does: it has no directories, so a listing of
  `checkpoints/` before its first object exists is empty, not a missing object (issue 25
  item 4: gcsfs answered an empty listing with a GET of the object `run/checkpoints` and
  raised `FileNotFoundError: b/<bucket>/o/run%2Fcheckpoints`, failing a first save whose
  listing raced the probe or the first upload).
- `retry(fn, what)`: calls `fn` until it succeeds, backing off from 1 s to 30 s, for at most
  the run's budget (`train.storage_retry_budget_s`, `set_budget`), printing one line when
  `what` stalls and one when it resumes. Errors that are not transient (a missing object,
  a refused permission) are raised at once.
- `Background`: writes (metrics segments, TensorBoard flushes) run on one thread, in the
  order given, each retried until it succeeds, so training goes on through an outage and
  nothing is dropped or written twice (every write names its object, so a retry rewrites
  the same object).
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

REQUEST_TIMEOUT_S = 20.0  # one gcsfs request (connect and answer)
STALL_NOTICE_S = 10.0  # a call this long without an answer is announced as stalled
DEFAULT_BUDGET_S = 600.0  # train.storage_retry_budget_s
_BUDGET = [DEFAULT_BUDGET_S]
_MAX_BACKOFF_S = 30.0
# Words of the errors the clients raise for a refused or unanswered request, or a server
# that is overloaded or restarting (gcsfs/aiohttp, google-cloud-storage, tensorstore).
_TRANSIENT = ("unavailable", "deadline", "timed out", "timeout", "connect", "refused",
              "reset by peer", "disconnected", "broken pipe", "temporarily", "aborted",
              " 500", " 502", " 503", " 504", " 429", "too many requests", "retries",
              "serverdisconnected", "clientoserror", "remotedisconnected")


class StorageStalled(RuntimeError):
    """Storage did not answer within the retry budget; the message names what and how long."""


def set_budget(seconds: float) -> None:
    """The retry budget of this process (`train.storage_retry_budget_s`)."""
    _BUDGET[0] = float(seconds)


def budget() -> float:
    return _BUDGET[0]


def cause(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")


def transient(e: BaseException) -> bool:
    """Whether `e` is an outage (worth retrying) rather than an answer (a missing object)."""
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                      NotADirectoryError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    text = f" {type(e).__name__} {e}".lower()
    return any(word in text for word in _TRANSIENT)


def say(text: str) -> None:
    """One line on stderr (the outage lines: stalled, resumed)."""
    print(text, file=sys.stderr, flush=True)


def retry(fn: Callable[[], Any], what: str, budget_s: float | None = None,
          stop: Callable[[], bool] | None = None) -> Any:
    """fn(), retried with backoff while it fails transiently, for at most `budget_s`
    (default: the run's budget); then StorageStalled. `stop()` true ends the retries early
    (the last error is raised). One line when it first stalls, one when it resumes."""
    limit = budget() if budget_s is None else budget_s
    start, delay = time.monotonic(), 1.0
    stalled = threading.Event()  # set once the stall was announced

    def announce(why: str) -> None:
        if not stalled.is_set():
            stalled.set()
            say(f"warning: storage stalled: {what} ({why}); retrying for up to {limit:.0f} s")

    # A request that hangs (the client's own deadline and retries not yet spent) is a
    # stall too: announced after STALL_NOTICE_S without an answer.
    timer = threading.Timer(STALL_NOTICE_S, announce,
                            (f"no answer for {STALL_NOTICE_S:g} s",))
    timer.daemon = True
    timer.start()
    try:
        while True:
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - sorted by `transient`
                if not transient(e):
                    raise
                waited = time.monotonic() - start
                if waited >= limit:
                    raise StorageStalled(f"{what}: storage did not answer for {waited:.0f} s "
                                         f"(train.storage_retry_budget_s={limit:g}; "
                                         f"{cause(e)})") from e
                if stop is not None and stop():
                    raise
                announce(cause(e))
                time.sleep(min(delay, max(0.05, limit - waited)))
                delay = min(2 * delay, _MAX_BACKOFF_S)
                continue
            if stalled.is_set():
                say(f"storage resumed: {what} after {time.monotonic() - start:.0f} s")
            return out
    finally:
        timer.cancel()


class Background:
    """One thread that runs writes in order, each retried (transient errors) until it
    succeeds; training never waits for them. `drain(timeout)` waits for what is queued."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._closing = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def put(self, what: str, fn: Callable[[], Any]) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put((what, fn))

    def _work(self) -> None:
        while True:
            what, fn = self._queue.get()
            try:
                retry(fn, what, budget_s=float("inf"), stop=lambda: self._closing)
            except Exception as e:  # noqa: BLE001 - an answer, not an outage: say so, go on
                say(f"warning: {what} failed ({cause(e)}); not retried")
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Waits up to `timeout` s for every queued write; whether they all completed."""
        end = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float) -> bool:
        """drain(timeout), then stop retrying what is left (it is reported by the caller)."""
        done = self.drain(timeout)
        self._closing = True
        return done


@functools.cache
def configure_clients() -> None:
    """Deadlines for gcsfs requests, and empty listings for empty prefixes (see the module
    docstring). Idempotent; called by `workdir.configure_storage`, before tensorstore's
    HTTP transport starts (it reads these once): a request that receives nothing for
    REQUEST_TIMEOUT_S fails (and is retried) instead of waiting forever."""
    for name, value in (("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", REQUEST_TIMEOUT_S),
                        ("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", REQUEST_TIMEOUT_S),
                        ("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", 1)):
        os.environ.setdefault(name, str(int(value)))
    try:
        import aiohttp
        import fsspec.config
        import gcsfs
    except ImportError:
        return
    fsspec.config.conf.setdefault("gs", {}).setdefault(
        "requests_timeout", aiohttp.ClientTimeout(  # per read, so a large upload may take long
            total=None, sock_connect=REQUEST_TIMEOUT_S, sock_read=REQUEST_TIMEOUT_S))
    cls = gcsfs.GCSFileSystem
    listed = cls._list_objects

    async def _list_objects(self: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await listed(self, path, *args, **kwargs)
        except FileNotFoundError:
            if self.split_path(path)[1]:  # a prefix in a bucket: nothing under it
                return []
            raise  # a bucket that does not exist

    cls._list_objects = _list_objects
