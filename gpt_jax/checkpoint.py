"""Checkpoints: one orbax manager for pretraining, fine-tuning and RLHF.

A workdir holds `config.json` (the resolved config), `checkpoints/<step>/`
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
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from gpt_jax import config as config_lib

CONFIG_FILE = "config.json"
ITEMS = ("params", "opt_state", "meta")


def write_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """Writes the resolved config once, atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(config_lib.to_json(cfg))
    tmp.replace(path / CONFIG_FILE)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a gpt_jax workdir?")
    return config_lib.from_json(path.read_text())


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
        workdir = os.fspath(workdir)
        if "://" not in workdir:  # orbax wants absolute paths (gs:// ones already are)
            workdir = os.path.abspath(workdir)
        self.directory = os.path.join(workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict,
             eval_loss: float | None = None, force: bool = False) -> None:
        metrics = None if eval_loss is None or not math.isfinite(eval_loss) else {
            "eval_loss": float(eval_loss)}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)

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


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, dict]:
    """(params, meta) of a workdir's latest (or given) checkpoint: for sampling,
    evaluation and initialising fine-tuning, SFT and RLHF from a pretrained run.
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


def restore_on_mesh(workdir: str, boxed: Any, mesh: jax.sharding.Mesh,
                    cfg: ml_collections.ConfigDict) -> Any:
    """A workdir's latest params (a tree shaped like the boxed abstract `boxed`), laid out on
    `mesh` with the shardings the logical-axis rules of `cfg` give them."""
    from gpt_jax import model as model_lib
    from gpt_jax import sharding

    abstract = abstract_with_shardings(model_lib.unbox(boxed),
                                       sharding.tree_shardings(boxed, mesh, cfg))
    params, _ = restore_params(workdir, abstract)
    return params
