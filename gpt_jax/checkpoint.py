"""Checkpoints: one orbax manager for pretraining, fine-tuning and RLHF.

A workdir (see `workdir.py` for its layout) holds `checkpoints/<step>/`
with items `params`, `opt_state` (both saved sharded, restorable onto any
mesh) and `meta` (JSON: step, data position, seeds, eval loss), plus what the
trainer writes beside them. Orbax writes each step to a temporary directory
and renames it when complete (on gs://, where nothing is renamed, it writes
`commit_success.txt` last), so a run killed mid-save leaves the previous
checkpoint as the latest; saves are asynchronous so training does not wait.

Two ways to open a run's checkpoints. The trainers' `Checkpointer(workdir)` writes them;
every reader (sample, evaluate, convert --to_hf, finetune/RLHF `--init_from`, PPO's reward
and reference runs, all through `workdir.open_run`) gets `Checkpointer(workdir,
read_only=True)`, which never writes, renames or deletes anything in the workdir: a reader
of a live run leaves the trainer's in-flight temporary directory alone.

Faults. `check()` (called by the loop every step) surfaces a failed asynchronous save at
once, naming the directory, instead of at the next save. Each checkpoint is sealed as part
of its own commit: process 0 writes `checksums.json` (sha256 of every file the save wrote,
read back from storage, not from device memory) into the step's temporary directory after
orbax has finalized its items and before the rename (or `commit_success.txt`) that makes
the step count, so a finished checkpoint always carries its checksums. `restore_latest`
verifies them and falls back to the newest checkpoint that verifies and restores, with one
warning line naming each step it passes over; an unsealed checkpoint (written before
sealing was part of the commit, or its checksums.json removed) is unverified, so an older
sealed one wins over it, and it is restored (with a warning) only when no sealed one does.
The trainer moves a checkpoint it passes over to `<workdir>/quarantine/` for inspection (it
would otherwise block the save of that step); a reader leaves it where it is.

Outages. A save that fails (storage refused or did not answer it) keeps the previous good
checkpoint: orbax commits a step only once all of it is written, so the failed one never
counts. With `max_failed_saves` > 1 it costs one warning line and training goes on, the
next interval's save retrying; the run stops (CheckpointError, exit 1) only when that many
saves in a row have failed, or at once when the cause is the disk's (full, read-only).
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from gpt_jax.workdir import (
    Workdir,
    atomic_write_bytes,
    describe_error,
    file_sha256,
    move_tree,
    probe_writable,
)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what restore lays out onto."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


CHECKSUMS_FILE = "checksums.json"
QUARANTINE_DIR = "quarantine"
# Files orbax writes or rewrites at the commit itself, after the seal: the step metadata's
# commit timestamp and the commit marker. Their damage cannot change what a restore loads.
COMMIT_FILE = "commit_success.txt"  # orbax's commit marker (on gs://, what makes a step count)
_COMMIT_FILES = frozenset({CHECKSUMS_FILE, COMMIT_FILE, "_CHECKPOINT_METADATA"})
UNSEALED = "no checksums.json: unsealed, so it cannot be verified"
_READER_ROUNDS = 3  # listings a reader tries when a live trainer deletes what it was reading


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory or step."""


def _files(directory: epath.Path) -> list[epath.Path]:
    out = []
    for path in sorted(directory.iterdir()):
        if path.is_dir():
            out += _files(path)
        elif path.name not in _COMMIT_FILES:
            out.append(path)
    return out


def file_checksums(step_dir: str | os.PathLike) -> dict[str, str]:
    """{path relative to the step directory: sha256} of every file a save wrote (not the
    files of the commit itself, see _COMMIT_FILES)."""
    root = epath.Path(step_dir)
    sums = {}
    for path in _files(root):
        sums[os.fspath(path)[len(os.fspath(root)) + 1:]] = file_sha256(path)
    return sums


def write_checksums(step_dir: str | os.PathLike) -> None:
    """Seals a checkpoint directory: writes its checksums.json from the bytes in storage."""
    sums = file_checksums(step_dir)
    atomic_write_bytes(epath.Path(step_dir) / CHECKSUMS_FILE,
                       json.dumps(sums, indent=1).encode())


def verify_checksums(step_dir: str | os.PathLike) -> str | None:
    """Why the checkpoint in `step_dir` fails its checksums (a file missing, changed or
    truncated), UNSEALED when it has none, or None when it verifies."""
    root = epath.Path(step_dir)
    try:
        want = json.loads((root / CHECKSUMS_FILE).read_text())
    except FileNotFoundError:
        return UNSEALED
    except ValueError:
        return f"{CHECKSUMS_FILE} is not readable JSON"
    for name, digest in want.items():
        try:
            have = file_sha256(root / name)
        except FileNotFoundError:
            return f"{name} is missing"
        if have != digest:
            return f"{name} does not match its checksum"
    return None


# A full disk, a read-only or unwritable one: no outage, so no later save would do better.
_LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _local_failure(e: BaseException | None) -> bool:
    """Whether a failed save's cause (or what caused it) is the disk's, not an outage."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in _LOCAL_ERRNOS:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _warn(text: str) -> None:
    logging.warning(text)
    print(f"warning: {text}", file=sys.stderr, flush=True)


class Checkpointer:
    """A run's checkpoints: the last `keep` plus the best by eval loss (writable), or
    read-only (`read_only=True`: restore only; nothing in the workdir changes)."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, async_save: bool = True,
                 *, read_only: bool = False, max_failed_saves: int = 1) -> None:
        self.workdir = Workdir(workdir)
        self.directory = self.workdir.checkpoints
        self.read_only = read_only
        self._async = async_save
        self._sealed: set[int] = set()
        self._saving: int | None = None  # the step whose save is in flight
        self._max_failed = max_failed_saves
        self.failed_saves = 0  # consecutive saves that failed
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, cleanup_tmp_directories=False,
                save_interval_steps=0, enable_async_checkpointing=False,
                lightweight_initialize=True)
        else:
            policy = pp.AnyPreservationPolicy([
                pp.LatestN(n=keep),
                pp.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                         keep_checkpoints_without_metrics=False),
            ])
            # Always orbax's asynchronous checkpointer: its post-finalization callback
            # (run on the primary process once every item is finalized, before the commit)
            # is where the seal is written; a synchronous save waits for it (see save()).
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policy, enable_async_checkpointing=True, create=True,
                cleanup_tmp_directories=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_pending))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def check_writable(self) -> None:
        """Fails before any compile when checkpoints could not be written."""
        try:
            probe_writable(self.directory)
        except Exception as e:  # noqa: BLE001 - any client's failure becomes one line
            raise CheckpointError(f"{describe_error(self.directory, e)}: checkpoints cannot "
                                  "be written there; fix its permissions or use another "
                                  "--workdir") from None

    def check(self) -> None:
        """Raises CheckpointError now if an asynchronous save has failed."""
        # A failed write surfaces in orbax's finalize thread, and check_for_errors() does
        # not see it once that thread has taken it; join the thread (instantly: it is done)
        # when it holds an exception. (`_finalize_thread` is orbax-internal; without it,
        # the error still surfaces at the next save.)
        holder = getattr(self.manager, "_finalize_thread", None)
        try:
            if holder is not None and holder.map(
                    lambda t: t is not None and not t.is_alive() and t.exception is not None):
                self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._failure(e)

    def _failure(self, e: BaseException) -> None:
        """A save failed: one warning line while fewer than `max_failed_saves` in a row
        have, else CheckpointError."""
        self.failed_saves += 1
        if self.failed_saves >= self._max_failed or _local_failure(e):
            raise self._save_failed(e) from e
        cause = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        _warn(f"saving checkpoint step {self._saving} in {self.directory} failed ({cause}); "
              f"{self.failed_saves} of train.max_failed_saves={self._max_failed} in a row. "
              f"Training goes on; the last good checkpoint is step {self._last_good()}, and "
              "the next interval's save retries")

    def last_good(self) -> int | None:
        """The newest checkpoint this run sealed and orbax committed (None if none)."""
        return self._last_good()

    def _save_failed(self, e: BaseException) -> CheckpointError:
        cause = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        times = (f" ({self.failed_saves} saves in a row, train.max_failed_saves="
                 f"{self._max_failed})" if self._max_failed > 1 else "")
        return CheckpointError(f"saving a checkpoint in {self.directory} failed ({cause})"
                               f"{times}; stopping. The last good checkpoint is step "
                               f"{self._last_good()}")

    def _last_good(self) -> int | None:
        steps = [s for s in self.manager.all_steps() if s in self._sealed]
        return max(steps) if steps else None

    def _seal_pending(self) -> None:
        """Orbax's post-finalization callback (primary process, background thread): seals
        the step being saved inside its temporary directory, before the commit. Raising
        here fails the save, so an unsealed checkpoint is never committed."""
        step = self._saving
        if step is None:
            raise CheckpointError("a save that bypassed Checkpointer.save cannot be sealed")
        final = self.step_dir(step)
        tmp = ocp.path.atomicity_defaults.get_default_temporary_path_class(final).from_final(
            final).get()  # orbax's own choice: `<step>.orbax-checkpoint-tmp`, or on gs:// final
        write_checksums(tmp)
        self._sealed.add(step)

    def verify(self, step: int) -> str | None:
        """Why checkpoint `step` fails its checksums, UNSEALED, or None when it verifies."""
        return verify_checksums(self.step_dir(step))

    def save(self, step: int, params: Any, opt_state: Any, meta: dict,
             eval_loss: float | None = None, force: bool = False) -> None:
        """Saves (and, within its commit, seals) checkpoint `step`; asynchronously unless
        the Checkpointer was made with async_save=False."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; not saving step "
                                  f"{step}")
        metrics = None if eval_loss is None or not math.isfinite(eval_loss) else {
            "eval_loss": float(eval_loss)}
        try:
            self.manager.wait_until_finished()  # orbax saves one step at a time
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - the previous save failed: count it
            self._failure(e)
        if self._saving is not None and self._saving in self.manager.all_steps():
            self.failed_saves = 0  # the previous save committed
        try:
            self._saving = step
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)
            if not self._async:
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - any failure of the save path, named
            self._failure(e)

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any | None = None,
                       before_restore: Any = None) -> tuple[int, dict] | None:
        """(step, restored) of the newest sealed checkpoint that verifies and restores (an
        unsealed one only when none does), or None if there is none. Each checkpoint passed
        over gets one warning line naming its step (and, when writable, is moved to
        quarantine/); `before_restore(step)` may refuse a checkpoint (e.g. another model
        shape) by raising, which stops the search. A reader whose checkpoint is deleted
        under it (a live trainer keeps only the last few) lists them again."""
        for _ in range(_READER_ROUNDS if self.read_only else 1):
            found, vanished = self._restore_newest(abstract_params, abstract_opt_state,
                                                   before_restore)
            if not vanished:
                return found
            self.manager.reload()
        raise CheckpointError(f"the checkpoints in {self.directory} were deleted while "
                              "being read, repeatedly; retry")

    def _restore_newest(self, abstract_params: Any, abstract_opt_state: Any,
                        before_restore: Any) -> tuple[tuple[int, dict] | None, bool]:
        """(found, whether a checkpoint vanished while being read) for one listing."""
        def attempt(step: int) -> tuple[dict | None, str | None]:
            if before_restore is not None:
                before_restore(step)
            try:
                return self.restore(step, abstract_params, abstract_opt_state), None
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint: try an older one
                return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"

        bad, unsealed = [], []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem == UNSEALED:
                unsealed.append(step)
                continue
            if problem is None:
                restored, problem = attempt(step)
                if restored is not None:
                    self._sealed.add(step)
                    for old in unsealed:
                        self._pass_over(old, f"unverified ({UNSEALED})",
                                        "falling back to an older sealed one")
                    return (step, restored), False
            if self._vanished(step):
                return None, True
            self._pass_over(step, f"damaged: {problem}", "falling back to an older one")
            bad.append(step)
        for step in unsealed:  # no sealed checkpoint restores: the unverified ones, loudly
            restored, problem = attempt(step)
            if restored is not None:
                _warn(f"checkpoint step {step} in {self.directory} has {UNSEALED}; "
                      "restoring it unverified (no sealed checkpoint restores)")
                return (step, restored), False
            if self._vanished(step):
                return None, True
            self._pass_over(step, f"unsealed and damaged: {problem}", "trying an older one")
            bad.append(step)
        if bad:
            where = (f"moved to {self.workdir / QUARANTINE_DIR}" if not self.read_only
                     else "left in place")
            raise CheckpointError(f"no checkpoint in {self.directory} restores (damaged: "
                                  f"steps {sorted(bad, reverse=True)}, {where}); use another "
                                  "--workdir to start over")
        return None, False

    def _vanished(self, step: int) -> bool:
        """Whether a reader's checkpoint was deleted (by the run's trainer) under it."""
        if not self.read_only:
            return False
        self.manager.reload()
        return step not in self.manager.all_steps()

    def _pass_over(self, step: int, why: str, then: str) -> None:
        """One warning line for a checkpoint not restored; the trainer quarantines it."""
        moved = ""
        if not self.read_only:
            moved = f"; moved to {self.workdir / QUARANTINE_DIR}"
            self._quarantine(step)
        _warn(f"checkpoint step {step} in {self.directory} is {why}{moved}; {then}")

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            move_tree(self.step_dir(step), self.workdir.path / QUARANTINE_DIR
                      / f"checkpoint-{step}-{int(time.time())}", delete_first=(COMMIT_FILE,))
        self.manager.reload()

    def saved_params(self, step: int) -> Any:
        """The params tree of checkpoint `step` as array metadata (shapes, dtypes), read
        without loading any array: to check a config against a run before restoring."""
        return self.manager.item_metadata(step)["params"]

    def restore(self, step: int, abstract_params: Any,
                abstract_opt_state: Any | None = None) -> dict:
        """Restores onto the shardings carried by the abstract trees; skips opt_state if None."""
        items = {"params": ocp.args.StandardRestore(abstract_params),
                 "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {name: restored[name] for name in items}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save; a failed one stops the run (it was the last chance)."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self.failed_saves = self._max_failed - 1
            self._failure(e)
        self.manager.close()


def restore_params(workdir: str | os.PathLike, abstract_params: Any,
                   step: int | None = None) -> tuple[Any, dict]:
    """(params, meta) of a workdir's latest (or given) checkpoint, opened read-only;
    `workdir.open_run` is the way tools open a run, this is its orbax half.
    Leaves of `abstract_params` without a sharding land on this process's first device,
    whatever devices wrote the checkpoint."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
        lambda a: a if getattr(a, "sharding", None) is not None
        else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), abstract_params)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        if step is None:
            found = ckpt.restore_latest(abstract_params)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
            restored = found[1]
        else:
            problem = ckpt.verify(step) if step in ckpt.manager.all_steps() else None
            if problem == UNSEALED:
                _warn(f"checkpoint step {step} in {ckpt.directory} has {problem}; restoring "
                      "it unverified")
            elif problem is not None:
                raise CheckpointError(f"checkpoint step {step} in {ckpt.directory} is "
                                      f"damaged ({problem}); choose another --step")
            restored = ckpt.restore(step, abstract_params)
        return restored["params"], restored["meta"]
    finally:
        ckpt.manager.close()
