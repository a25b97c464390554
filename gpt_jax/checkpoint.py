"""Checkpoints: one orbax manager for pretraining, fine-tuning and RLHF.

A workdir (see `workdir.py` for its layout) holds `checkpoints/<step>/`
with items `params`, `opt_state` (both saved sharded, restorable onto any
mesh) and `meta` (JSON: step, data position, seeds, eval loss), plus what the
trainer writes beside them. Orbax writes each step to a temporary directory
and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest; saves are asynchronous so training does not wait.

Faults. `check()` (called by the loop every step) surfaces a failed asynchronous save at
once, naming the directory, instead of at the next save. Each finished checkpoint is
sealed with `checksums.json` (sha256 of every file the save wrote, computed from those
bytes, not from device memory); `restore_latest` verifies it and falls back to the newest
checkpoint that verifies and restores, moving a damaged one aside to
`<workdir>/quarantine/` for inspection (it would otherwise block the save of that step).
"""

from __future__ import annotations

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

from gpt_jax.workdir import Workdir, atomic_write_bytes, describe_error, file_sha256, probe_writable


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what restore lays out onto."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


CHECKSUMS_FILE = "checksums.json"
QUARANTINE_DIR = "quarantine"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory or step."""


def _files(directory: epath.Path) -> list[epath.Path]:
    out = []
    for path in sorted(directory.iterdir()):
        if path.is_dir():
            out += _files(path)
        elif path.name != CHECKSUMS_FILE:
            out.append(path)
    return out


def file_checksums(step_dir: str | os.PathLike) -> dict[str, str]:
    """{path relative to the step directory: sha256} of every file of a checkpoint."""
    root = epath.Path(step_dir)
    sums = {}
    for path in _files(root):
        sums[os.fspath(path)[len(os.fspath(root)) + 1:]] = file_sha256(path)
    return sums


class Checkpointer:
    """Keeps the last `keep` checkpoints plus the best by eval loss."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, async_save: bool = True) -> None:
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.workdir = Workdir(workdir)
        self.directory = self.workdir.checkpoints
        self._sealed: set[int] = set()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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
            raise self._save_failed(e) from e

    def _save_failed(self, e: BaseException) -> CheckpointError:
        cause = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return CheckpointError(f"saving a checkpoint in {self.directory} failed ({cause}); "
                               f"stopping. The last good checkpoint is step "
                               f"{self._last_good()}")

    def _last_good(self) -> int | None:
        steps = [s for s in self.manager.all_steps() if s in self._sealed]
        return max(steps) if steps else None

    def seal(self) -> None:
        """Writes checksums.json into every finished checkpoint that lacks one (process 0),
        from the bytes on disk. Orbax finishes a save before it starts the next, so this
        runs before each save and at close."""
        if jax.process_index() != 0:
            return
        for step in self.manager.all_steps():
            step_dir = epath.Path(self.directory) / str(step)
            if step in self._sealed or (step_dir / CHECKSUMS_FILE).exists():
                self._sealed.add(step)
                continue
            sums = file_checksums(step_dir)
            atomic_write_bytes(step_dir / CHECKSUMS_FILE, json.dumps(sums, indent=1).encode())
            self._sealed.add(step)

    def verify(self, step: int) -> str | None:
        """Why checkpoint `step` fails its checksums (a file missing, changed or truncated),
        or None when it verifies or was never sealed."""
        step_dir = epath.Path(self.directory) / str(step)
        try:
            want = json.loads((step_dir / CHECKSUMS_FILE).read_text())
        except FileNotFoundError:
            return None
        have = file_checksums(step_dir)
        for name, digest in want.items():
            if name not in have:
                return f"{name} is missing"
            if have[name] != digest:
                return f"{name} does not match its checksum"
        return None

    def save(self, step: int, params: Any, opt_state: Any, meta: dict,
             eval_loss: float | None = None, force: bool = False) -> None:
        metrics = None if eval_loss is None or not math.isfinite(eval_loss) else {
            "eval_loss": float(eval_loss)}
        try:
            self.manager.wait_until_finished()  # the previous save, which seal() needs whole
            self.manager.check_for_errors()
            self.seal()
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)
        except Exception as e:  # noqa: BLE001 - any failure of the save path, named
            raise self._save_failed(e) from e

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any | None = None,
                       before_restore: Any = None) -> tuple[int, dict] | None:
        """(step, restored) of the newest checkpoint that verifies and restores, or None if
        there is none. A damaged one gets one warning line and is moved to quarantine/;
        `before_restore(step)` may refuse a checkpoint (e.g. another model shape) by
        raising, which stops the search."""
        bad = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem is None:
                if before_restore is not None:
                    before_restore(step)
                try:
                    return step, self.restore(step, abstract_params, abstract_opt_state)
                except Exception as e:  # noqa: BLE001 - a damaged checkpoint: try an older one
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            logging.warning("checkpoint %d in %s is damaged (%s); moved to %s and trying "
                            "an older one", step, self.directory, problem, QUARANTINE_DIR)
            print(f"warning: checkpoint step {step} in {self.directory} is damaged "
                  f"({problem}); falling back to an older one", file=sys.stderr, flush=True)
            self._quarantine(step)
            bad.append(step)
        if bad:
            raise CheckpointError(f"no checkpoint in {self.directory} restores (damaged: "
                                  f"steps {bad}, moved to {self.workdir / QUARANTINE_DIR}); "
                                  "use another --workdir to start over")
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            target = self.workdir.path / QUARANTINE_DIR
            target.mkdir(parents=True, exist_ok=True)
            (epath.Path(self.directory) / str(step)).rename(
                target / f"checkpoint-{step}-{int(time.time())}")
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
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from e
        self.seal()
        self.manager.close()


def restore_params(workdir: str | os.PathLike, abstract_params: Any,
                   step: int | None = None) -> tuple[Any, dict]:
    """(params, meta) of a workdir's latest (or given) checkpoint; `workdir.open_run` is the
    way tools open a run, this is its orbax half.
    Leaves of `abstract_params` without a sharding land on this process's first device,
    whatever devices wrote the checkpoint."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
        lambda a: a if getattr(a, "sharding", None) is not None
        else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), abstract_params)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if step is None:
            found = ckpt.restore_latest(abstract_params)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
            restored = found[1]
        else:
            restored = ckpt.restore(step, abstract_params)
        return restored["params"], restored["meta"]
    finally:
        ckpt.manager.close()
