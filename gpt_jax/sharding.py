"""The device mesh and the one table that maps logical axis names to mesh axes.

The model names every parameter dimension (`vocab`, `embed`, `heads`, ...);
`rules(cfg)` below is the only place those names meet the mesh axes `data`
and `model`. Megatron-style tensor parallelism falls out of the table: QKV and
MLP-in are column-parallel (`heads`, `mlp` on `model`), the output projections
row-parallel (their input dims on `model`), embedding and logits
vocabulary-parallel. With `mesh.fsdp` the `embed` dimension of every weight is
also sharded over `data` (ZeRO-3 style), so params and Adam moments scale down
with the data-parallel degree.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt_jax.config import ConfigError

AXES = ("data", "model")


# The rules that never depend on the config, and the only ones activations use: the
# residual stream's features stay whole on every device, so under FSDP XLA gathers
# the weights rather than resharding the activations over `data`.
ACTIVATION_RULES = (("batch", "data"), ("act_embed", None))


def rules(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """Logical axis -> mesh axis (None = replicated)."""
    return (
        *ACTIVATION_RULES,
        ("vocab", "model"),
        ("heads", "model"),
        ("mlp", "model"),
        ("embed", "data" if cfg.mesh.fsdp else None),
        ("kv", None),
        ("position", None),
        ("layers", None),
    )


def activation_sharding(mesh: Mesh) -> contextlib.AbstractContextManager:
    """The context in which `constrain` binds to `mesh` (traced inside jit)."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation to ACTIVATION_RULES on the mesh of `activation_sharding`;
    a no-op outside it (sampling, single-device tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = PartitionSpec(*(dict(ACTIVATION_RULES).get(a) for a in logical_axes))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
    """(data, model) sizes; `mesh.data=-1` takes every device `model` leaves."""
    model = cfg.mesh.model
    if num_devices % model:
        raise ConfigError(
            f"mesh.model={model} does not divide the {num_devices} available devices")
    data = num_devices // model if cfg.mesh.data == -1 else cfg.mesh.data
    if data * model != num_devices:
        raise ConfigError(
            f"mesh.data={cfg.mesh.data} x mesh.model={model} = {data * model} devices, "
            f"but {num_devices} are available; set mesh.data=-1 to use all of them")
    return data, model


def make_mesh(cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A ('data', 'model') mesh over all devices; multi-slice when mesh.dcn_data > 1."""
    devices = jax.devices() if devices is None else devices
    data, model = mesh_shape(cfg, len(devices))
    vocab = cfg.model.vocab_size
    if vocab % model:  # embedding and logits are vocabulary-parallel (see `rules`)
        padded = -(-vocab // math.lcm(128, model)) * math.lcm(128, model)
        raise ConfigError(
            f"model.vocab_size={vocab} is not divisible by mesh.model={model}: the embedding "
            f"and logits are split over the vocabulary; pad it, e.g. model.vocab_size={padded} "
            f"(ids the tokenizer never produces only cost memory)")
    dcn = cfg.mesh.dcn_data
    if dcn > 1:
        if data % dcn:
            raise ConfigError(f"mesh.dcn_data={dcn} does not divide the data axis ({data})")
        grid = mesh_utils.create_hybrid_device_mesh(
            (data // dcn, model), (dcn, 1), devices=devices)
    elif len(devices) > 1 and devices[0].platform != "cpu":
        # Split physical torus axes only when the logical shape needs it (e.g. 32 x 16
        # on a v5p-1024's 8 x 8 x 8 chips).
        grid = mesh_utils.create_device_mesh((data, model), devices=devices,
                                             allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, AXES)


def check_batch(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The per-microbatch batch must split evenly over the data axis (and hosts)."""
    micro = cfg.train.batch_size // cfg.train.microbatches
    data = mesh.shape["data"]
    if micro % data:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / train.microbatches="
            f"{cfg.train.microbatches} = {micro} sequences per microbatch is not divisible "
            f"by the data axis of the mesh ({data} devices)")
    if micro % jax.process_count():
        raise ConfigError(
            f"{micro} sequences per microbatch do not split over {jax.process_count()} hosts")


def logical_to_sharding(logical_specs: Any, mesh: Mesh, cfg: ml_collections.ConfigDict) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(cfg))


def tree_shardings(boxed_tree: Any, mesh: Mesh, cfg: ml_collections.ConfigDict) -> Any:
    """NamedShardings for a pytree whose leaves may be flax LogicallyPartitioned boxes
    (params, or optimizer state built on them); unboxed leaves are replicated.

    A box may hold no array: optax's partition (Muon's AdamW part) puts a MaskedNode in
    the boxes of the leaves another optimizer updates; that stays a MaskedNode.
    """
    def one(x: Any) -> Any:
        if isinstance(x, nn.meta.AxisMetadata) and not jax.tree.leaves(x.unbox()):
            return x.unbox()
        return logical_to_sharding(nn.get_partition_spec(x), mesh, cfg)

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Shard the batch dimension of an ndim-array over `data`; other dims replicated."""
    spec = [None] * ndim
    spec[batch_axis] = "data"
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def host_local_to_global(local_batch: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """Assemble each process's slice of the batch into one global sharded array."""
    sharding = batch_sharding(mesh, local_batch.ndim, batch_axis)
    return jax.make_array_from_process_local_data(sharding, local_batch)


def set_cpu_devices(cfg: ml_collections.ConfigDict) -> None:
    """Splits the host CPU into `mesh.cpu_devices` XLA devices; call before JAX starts.

    On a CPU-only host this makes the `data` axis data-parallel over cores: each
    device runs its share of the batch on its own thread, where one device runs most
    of a small model's ops single-threaded (benchmarks/README.md has the profile).
    An explicit count in the environment (XLA_FLAGS's
    --xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES) wins.
    """
    n = cfg.mesh.get("cpu_devices", 1)
    explicit = ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
                or "JAX_NUM_CPU_DEVICES" in os.environ)
    if n > 1 and not explicit:
        jax.config.update("jax_num_cpu_devices", n)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """`jax.distributed.initialize` when this is one of several processes.

    Explicit flags win; otherwise JAX's own cluster detection is used on Cloud
    TPU VMs with several workers, multi-slice and SLURM jobs of several tasks.
    A single process does nothing. On CPU the collectives go through gloo.
    """
    if coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # no-op off CPU
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    multi_slice = "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if multi_tpu or multi_slice or slurm:
        jax.distributed.initialize()
