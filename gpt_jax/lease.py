"""One writer per run: the lease a trainer holds on its workdir (`lease.json`).

Two trainers on one `--workdir` would both write checkpoints and metrics and leave a run
that mixes the two. So `loop.run` takes the workdir's lease before anything is written
(process 0, for the whole job) and gives it back at exit. The lease names its holder
(host, pid, start time) and carries a heartbeat that a background thread refreshes every
`timeout_s / 5` seconds.

A second writer is refused in one line naming the holder. A lease whose holder is gone is
taken over with a one-line warning: its pid is not running on this host (or is another
process now), or its heartbeat is older than `timeout_s` (`train.lease_timeout_s`; hosts'
clocks must agree to well within it). A holder that finds its lease taken over (it was
suspended, or its storage was unreachable, for longer than the timeout) stops at the next
step without writing more (`Lease.check`).

Atomicity. On Cloud Storage every write carries an object-generation precondition
(google-cloud-storage `if_generation_match`: 0 to create, the generation read to refresh
or take over), so of two hosts racing for the lease exactly one wins. Locally the lease is
created with a hard link of a complete temporary file (fails if one exists), and a
refresh, take-over or release compares and replaces under an `flock` of `lease.json.lock`
(atomic rename).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from absl import logging

from gpt_jax.checkpoint import CheckpointError
from gpt_jax.config import ConfigError
from gpt_jax.workdir import Workdir, WorkdirError, describe_error

LEASE_FILE = "lease.json"
DEFAULT_TIMEOUT_S = 300.0  # train.lease_timeout_s
_HELD: set[str] = set()  # tokens of the leases this process holds


class LeaseError(WorkdirError):
    """Another live writer holds the workdir (exit 2, before compute)."""


class LeaseLostError(CheckpointError):
    """This run's lease was taken over: it must not write checkpoints or metrics anymore."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease: what `lease.json` says."""

    host: str
    pid: int
    since: float  # when the holder took the lease (time.time())
    heartbeat: float  # its last refresh (time.time())
    token: str  # unique per acquisition
    proc_start: str = ""  # /proc/<pid>/stat start time, to tell a reused pid apart

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {since}"

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            return cls(host=str(d["host"]), pid=int(d["pid"]), since=float(d["since"]),
                       heartbeat=float(d["heartbeat"]), token=str(d["token"]),
                       proc_start=str(d.get("proc_start", "")))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: treated as gone


def _proc_start(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot), '' where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def gone(holder: Holder | None, timeout_s: float, now: float | None = None) -> str | None:
    """Why `holder` no longer holds its lease (a phrase), or None while it is alive."""
    if holder is None:
        return "the lease file is unreadable"
    now = time.time() if now is None else now
    if holder.host == socket.gethostname():
        if holder.pid == os.getpid():
            if holder.token not in _HELD:
                return "left by an earlier run of this process"
        else:
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return f"pid {holder.pid} is not running"
            except PermissionError:
                pass  # alive, another user's
            start = _proc_start(holder.pid)
            if holder.proc_start and start and start != holder.proc_start:
                return f"pid {holder.pid} is another process now"
    age = now - holder.heartbeat
    if age > timeout_s:
        return f"its heartbeat is {age:.0f} s old (train.lease_timeout_s={timeout_s:g})"
    return None


class _LocalStore:
    """lease.json in a local folder: create by hard link, compare-and-replace under flock."""

    def __init__(self, workdir: Workdir) -> None:
        self.path = os.fspath(workdir / LEASE_FILE)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def read(self) -> tuple[Holder | None, Any] | None:
        """(holder, version) or None when there is no lease; the version is the bytes."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return Holder.from_json(data), data

    def _temp(self, holder: Holder) -> str:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".lease-")
        with os.fdopen(fd, "wb") as f:
            f.write(holder.to_json())
        return tmp

    def create(self, holder: Holder) -> Any:
        tmp = self._temp(holder)
        try:
            os.link(tmp, self.path)  # atomic, complete, and fails if a lease exists
            return holder.to_json()
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path + ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:  # a filesystem without locks (a FUSE mount): best effort
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def replace(self, holder: Holder, version: Any) -> Any:
        """Writes `holder` if the lease still is `version`; the new version, or None."""
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return None
            tmp = self._temp(holder)
            os.replace(tmp, self.path)
            return holder.to_json()

    def delete(self, version: Any) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[1] == version:
                os.remove(self.path)


class _GcsStore:
    """lease.json as a Cloud Storage object, every write conditional on its generation."""

    def __init__(self, workdir: Workdir) -> None:
        from google.api_core import exceptions  # google-cloud-storage: only for gs:// runs
        from google.cloud import storage

        bucket, _, prefix = os.fspath(workdir).split("://", 1)[1].partition("/")
        self._precondition = (exceptions.PreconditionFailed, exceptions.NotFound)
        try:
            client = storage.Client()
        except OSError:  # no default project: objects do not need one
            client = storage.Client(project="none")
        self.blob_name = f"{prefix.rstrip('/')}/{LEASE_FILE}".lstrip("/")
        self._bucket = client.bucket(bucket)

    def read(self) -> tuple[Holder | None, Any] | None:
        blob = self._bucket.get_blob(self.blob_name, timeout=30)
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(if_generation_match=blob.generation, timeout=30)
        except self._precondition:
            return self.read()  # replaced between the two requests
        return Holder.from_json(data), blob.generation

    def _upload(self, holder: Holder, generation: int) -> Any:
        blob = self._bucket.blob(self.blob_name)
        try:
            blob.upload_from_string(holder.to_json(), content_type="application/json",
                                    if_generation_match=generation, timeout=30)
        except self._precondition:
            return None
        return blob.generation

    def create(self, holder: Holder) -> Any:
        return self._upload(holder, 0)

    def replace(self, holder: Holder, version: Any) -> Any:
        return self._upload(holder, version)

    def delete(self, version: Any) -> None:
        try:
            self._bucket.blob(self.blob_name).delete(if_generation_match=version, timeout=30)
        except self._precondition:
            pass


class Lease:
    """A held lease: `check()` raises once it was taken over; `release()` gives it back."""

    def __init__(self, workdir: Workdir, store: Any, holder: Holder, version: Any,
                 timeout_s: float) -> None:
        self.workdir, self._store, self.holder = workdir, store, holder
        self._version, self._timeout_s = version, timeout_s
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        _HELD.add(holder.token)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="gpt_jax-lease")
        self._thread.start()

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self._timeout_s / 5):
            try:
                self.refresh()
                failing = False
            except Exception as e:  # noqa: BLE001 - an outage: keep training, retry later
                if not failing:
                    logging.warning("lease heartbeat on %s failed (%s); retrying",
                                    self.workdir, describe_error(self.workdir, e))
                failing = True
            if self._lost:
                return

    def refresh(self) -> None:
        """Writes a new heartbeat, or marks the lease lost if another writer took it."""
        with self._lock:
            if self._lost or self._stop.is_set():
                return
            beat = dataclasses.replace(self.holder, heartbeat=time.time())
            version = self._store.replace(beat, self._version)
            if version is None:
                current = self._store.read()
                if current and current[0] and current[0].token == beat.token:
                    version = current[1]  # our own write, retried after its reply was lost
                else:
                    who = current[0].describe() if current and current[0] else "nobody"
                    self._lost = f"the lease on {self.workdir} was taken over (now {who})"
                    return
            self.holder, self._version = beat, version

    def check(self) -> None:
        """Raises LeaseLostError once another writer has taken the lease over."""
        if self._lost:
            raise LeaseLostError(f"{self._lost}: this run stops without writing more; "
                                 "one writer per workdir")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease, if it still is ours."""
        self._stop.set()
        with self._lock:
            _HELD.discard(self.holder.token)
            if self._lost:
                return
            try:
                self._store.delete(self._version)
            except Exception as e:  # noqa: BLE001 - the next run takes a stale lease over
                logging.warning("could not release the lease on %s: %s", self.workdir,
                                describe_error(self.workdir, e))


def acquire(workdir: str | os.PathLike | Workdir,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Lease:
    """Takes the workdir's lease, or raises LeaseError naming the live holder. A lease
    whose holder is gone (see `gone`) is taken over with one warning line on stderr."""
    workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    if not timeout_s > 0:
        raise ConfigError(f"train.lease_timeout_s={timeout_s!r} must be > 0 (seconds)")
    try:
        store = _GcsStore(workdir) if workdir.remote else _LocalStore(workdir)
        now = time.time()
        mine = Holder(host=socket.gethostname(), pid=os.getpid(), since=now, heartbeat=now,
                      token=uuid.uuid4().hex, proc_start=_proc_start(os.getpid()))
        for _ in range(5):  # each retry means the lease changed hands meanwhile
            version = store.create(mine)
            if version is not None:
                return Lease(workdir, store, mine, version, timeout_s)
            current = store.read()
            if current is None:
                continue  # released meanwhile
            holder, old = current
            if holder is not None and holder.token == mine.token:  # a retried create landed
                return Lease(workdir, store, mine, old, timeout_s)
            why = gone(holder, timeout_s)
            if why is None:
                break
            version = store.replace(mine, old)
            if version is not None:
                what = holder.describe() if holder else "an unknown holder"
                print(f"warning: took over the lease on {workdir} from {what}: {why}",
                      file=sys.stderr, flush=True)
                return Lease(workdir, store, mine, version, timeout_s)
    except (LeaseError, WorkdirError):
        raise
    except Exception as e:  # noqa: BLE001 - any client's failure becomes one line
        raise WorkdirError(f"cannot take the lease: {describe_error(workdir / LEASE_FILE, e)}"
                           ) from e
    current = store.read()
    who = current[0].describe() if current and current[0] else "another run"
    age = f", heartbeat {time.time() - current[0].heartbeat:.0f} s ago" if (
        current and current[0]) else ""
    raise LeaseError(f"--workdir={workdir} is being written by another run ({who}{age}): "
                     f"one writer per workdir; wait for it to finish, stop it, or use another "
                     f"--workdir (a holder that is gone is taken over after "
                     f"train.lease_timeout_s={timeout_s:g} s)")
