"""Checkpoints: one orbax manager for pretraining, fine-tuning and RLHF.

A workdir (see `workdir.py` for its layout) holds `checkpoints/<step>/`
with items `params`, `opt_state` (both saved sharded, restorable onto any
mesh) and `meta` (JSON: step, data position, seeds, eval loss), plus what the
trainer writes beside them. Orbax writes each step to a temporary directory
and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest; saves are asynchronous so training does not wait.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from gpt_jax.workdir import Workdir


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what restore lays out onto."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


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
        self.directory = Workdir(workdir).checkpoints
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict,
             eval_loss: float | None = None, force: bool = False) -> None:
        metrics = None if eval_loss is None or not math.isfinite(eval_loss) else {
            "eval_loss": float(eval_loss)}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)

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
        self.manager.wait_until_finished()
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
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        restored = ckpt.restore(step, abstract_params)
        return restored["params"], restored["meta"]
    finally:
        ckpt.close()
