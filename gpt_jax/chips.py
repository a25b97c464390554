"""One table of accelerator chips, read by `flops`, `bench`, `compile` and the loop.

Per chip: peak dense bf16 FLOP/s, HBM size and bandwidth, and the inter-chip link
bandwidth one chip can send (ICI on TPUs, NVLink on GPUs), from the vendors' data
sheets; for TPUs also the slice geometry that `gpt_jax.compile` needs to describe a
slice it has no access to (`parse_topology`, `topology_devices`: compile-only devices
from libtpu).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: HBM, peak dense bf16 FLOP/s, bandwidths; TPUs also their topology."""

    name: str  # TPUs: the generation in topology names ('v4', 'v5p', 'v5e', 'v6e')
    device_kinds: tuple[str, ...]  # prefixes of jax's `device_kind` for this chip
    hbm_gib: float
    peak_flops: float
    hbm_bw: float  # HBM bytes/s per chip
    ici_bw: float  # bytes/s one chip sends over all its inter-chip links together
    dims: int = 0  # TPUs: 3 for the 3D tori (v4, v5p), 2 for the 2D pods (v5e, v6e)
    cores_per_chip: int = 1  # the number in 'v5p-128' counts TensorCores: 2 per megacore
    chip_config: str = "default"


# TPUs, from the Cloud TPU system-architecture pages, cloud.google.com/tpu/docs/{v4,v5e,
# v5p,v6e}: peak bf16 (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s), HBM GB/s as printed
# (v4 1200, v5e 819, v5p 2765, v6e 1600), and ICI as half the "bidirectional ICI bandwidth
# per chip" (v5e 400, v5p 1200, v6e 800 GB/s), which is also the pages' "all-reduce
# bandwidth per Pod" over the Pod's chips (v5e 51.2 TB/s / 256); the v4 page gives only the
# latter: 1.1 PB/s / 4096 chips.
# GPUs, from NVIDIA's data sheets (SXM): dense bf16 without sparsity (A100 312, H100/H200
# 989 TFLOP/s), HBM (A100 80GB 2039, H100 3350, H200 4800 GB/s) and half the NVLink
# bandwidth (A100 600, H100/H200 900 GB/s both ways).
CHIPS = {
    "v4": Chip("v4", ("TPU v4",), 32, 275e12, 1200e9, 1.1e15 / 4096, 3, 2, "megacore"),
    "v5p": Chip("v5p", ("TPU v5p", "TPU v5"), 95, 459e12, 2765e9, 600e9, 3, 2, "megacore"),
    "v5e": Chip("v5e", ("TPU v5 lite", "TPU v5e"), 16, 197e12, 819e9, 200e9, 2, 1),
    "v6e": Chip("v6e", ("TPU v6 lite", "TPU v6e"), 32, 918e12, 1600e9, 400e9, 2, 1),
    "a100": Chip("a100", ("NVIDIA A100",), 80, 312e12, 2039e9, 300e9),
    "h100": Chip("h100", ("NVIDIA H100",), 80, 989e12, 3350e9, 450e9),
    "h200": Chip("h200", ("NVIDIA H200",), 141, 989e12, 4800e9, 450e9),
}
TPUS = {k: c for k, c in CHIPS.items() if c.dims}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


def chip_of(device: jax.Device | None = None) -> Chip | None:
    """The table's chip for a device (by the longest `device_kind` prefix), or None
    (CPUs, and accelerators not in the table)."""
    kind = (device or jax.devices()[0]).device_kind
    matches = [(len(p), c) for c in CHIPS.values() for p in c.device_kinds
               if kind.startswith(p)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice: e.g. 'v5p-128' is 64 v5p chips in a 4x4x4 torus."""

    name: str
    chip: Chip | None  # None: host CPU devices
    shape: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)


def slice_shape(num_chips: int, dims: int) -> tuple[int, ...]:
    """Chip grid of a slice: 3D slices grow from 2x2x1, 2D ones from 1x1, each time
    doubling the last of the smallest dimensions (2x2x4, 2x4x4, 4x4x4, 4x4x8, ...)."""
    if num_chips < 1 or num_chips & (num_chips - 1):
        raise ValueError(f"{num_chips} chips: slices here have a power-of-two number of chips")
    shape = [2, 2, 1] if dims == 3 and num_chips >= 4 else [1] * dims
    while math.prod(shape) < num_chips:
        i = max(j for j, d in enumerate(shape) if d == min(shape))
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """'v5p-128' (cores, as Cloud TPU names slices), 'v5e-16' / 'v5litepod-16' (chips),
    'v5p:4x4x4' (an explicit chip grid) or 'cpu:N' (N host CPU devices)."""
    if match := re.fullmatch(r"cpu:(\d+)", name):
        return Topology(name, None, (int(match.group(1)),))
    match = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)+))", name)
    gen = match and ALIASES.get(match.group(1), match.group(1))
    if not match or gen not in TPUS:
        raise ValueError(
            f"--topology={name!r}: expected e.g. v4-8, v5p-128, v5e-16, v5litepod-16, v6e-64, "
            f"v5p:4x4x4 or cpu:8 (generations: {sorted(TPUS)} and {sorted(ALIASES)})")
    chip = TPUS[gen]
    if match.group(3):
        shape = tuple(int(d) for d in match.group(3).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"--topology={name!r}: {gen} slices are {chip.dims}D")
    else:
        cores = int(match.group(2))
        if cores % chip.cores_per_chip:
            raise ValueError(f"--topology={name!r}: {gen}-N counts {chip.cores_per_chip} "
                             "cores per chip, so N must be even")
        try:
            shape = slice_shape(cores // chip.cores_per_chip, chip.dims)
        except ValueError as e:
            raise ValueError(f"--topology={name!r}: {e}") from None
    return Topology(name, chip, shape)


def topology_devices(topo: Topology) -> list:
    """Compile-only devices of a TPU slice (needs libtpu), or the first N CPU devices."""
    if topo.chip is None:
        devices = jax.devices("cpu")
        if len(devices) < topo.num_chips:
            raise ValueError(
                f"--topology={topo.name}: only {len(devices)} CPU devices; set "
                f"jax_num_cpu_devices (the CLI does) before JAX starts")
        return devices[:topo.num_chips]
    from jax.experimental import topologies
    shape = tuple(topo.shape) + (1,) * (3 - len(topo.shape))
    kwargs: dict[str, Any] = {}
    if topo.chip.dims == 3 and min(topo.shape) >= 4:
        kwargs["wrap"] = (True, True, True)  # full cubes and larger are tori
    try:
        desc = topologies.get_topology_desc(
            topology_name=f"{topo.chip.name}:{'x'.join(map(str, topo.shape))}", platform="tpu",
            chip_config_name=topo.chip.chip_config, num_slices=1,
            chips_per_host_bounds=tuple(min(2, d) for d in shape[:2]) + (1,), **kwargs)
    except Exception as e:  # noqa: BLE001 - a missing libtpu surfaces as several types
        raise RuntimeError(
            f"cannot describe TPU topology {topo.name} ({e.__class__.__name__}: {e}). "
            "Compiling for TPUs without one needs libtpu: pip install -e '.[tpu]'; "
            "or use --topology=cpu:N") from e
    return list(desc.devices)
