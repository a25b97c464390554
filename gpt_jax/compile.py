"""`python -m gpt_jax.compile --config=experiments/gpt3.py:6.7b --topology=v5p-128`: will it fit?

Lowers and compiles the real sharded train step (`loop.build_trainer`'s
`train_step`, with its in/out shardings and donation) ahead of time for a TPU
slice, on a machine without one: `jax.experimental.topologies` describes the
slice's chips (this needs libtpu, the `[tpu]` extra), the mesh is laid over
them by `sharding.make_mesh`, and the inputs are ShapeDtypeStructs carrying
their shardings, so nothing is allocated. `--topology=cpu:N` compiles for N
host CPU devices instead (no libtpu needed; no HBM to fit in).

Printed per chip: XLA's memory analysis (arguments, outputs, temporaries,
generated code; donated state is counted once) against the chip's HBM, and
whether it fits; then what one optimizer step costs and a roofline estimate.

XLA's `cost_analysis()` counts the body of a loop once, and the GPT-3 steps
loop (`model.scan_layers`, `train.microbatches` > 1), so the costs come from
`hlo_cost`, a walk of the optimized per-chip HLO (`compiled.as_text()`) that
weighs each computation by the trip counts of the loops around it: XLA's
`known_trip_count` where printed (CPU), else the loop condition's
`counter < constant` (TPU). The microbatch loop's bound is a traced argument
(the batch ramp), so it is counted `train.microbatches` times, the full batch.
The walk sums, per chip:
- matmul FLOPs: dots and convolutions (2 x output x contracted elements; XLA:TPU
  writes batched matmuls as convolutions whose windows are mostly padding, so
  only taps on real elements count). Elementwise work is left out; on an
  unrolled step this is a few percent under `cost_analysis()["flops"]`;
- HBM bytes: operands + results of the unfused ops (a fusion as one op; slices
  and in-place updates count only the slice), a rough figure that ignores
  on-chip reuse;
- ICI bytes a chip sends per collective, as ring algorithms move them.
Then, with the chip's peak bf16 FLOP/s, HBM bandwidth and ICI send bandwidth
(all links; Cloud TPU docs, see `CHIPS`), compute, memory and communication
times; the step estimate runs from max of the three (communication fully
overlapped) to max(compute, memory) + communication (not overlapped), and the
MFU estimate is model FLOPs / (peak x step) over that range. Model FLOPs are
`flops.flops_per_token` (6N + attention) x batch tokens, the trainer's MFU
numerator; MFU ceiling = model / compiled matmul FLOPs. Every resource is taken
at its peak rate, and idle time, latency and collectives that use only one mesh
axis's links are not modelled, so measured MFU will fall below the overlapped
end and may fall below the other.

`--table=docs/aot_table.md` compiles the GPT-3 sizes on the slices and settings
listed in `TABLE` and writes the markdown table of what fits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import loop, sharding
from gpt_jax import model as model_lib
from gpt_jax.flops import flops_per_token

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip, peak dense bf16 FLOP/s, bandwidths, topology."""

    name: str  # the generation in topology names: 'v4', 'v5p', 'v5e', 'v6e'
    hbm_gib: float
    peak_flops: float
    hbm_bw: float  # HBM bytes/s per chip
    ici_bw: float  # bytes/s one chip sends over all its inter-chip (ICI) links together
    dims: int  # 3 for the 3D tori (v4, v5p), 2 for the 2D pods (v5e, v6e)
    cores_per_chip: int  # the number in 'v5p-128' counts TensorCores: 2 per megacore chip
    chip_config: str


# From the Cloud TPU system-architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}:
# HBM GB/s as printed (v4 1200, v5e 819, v5p 2765, v6e 1600), and ICI as half the
# "bidirectional ICI bandwidth per chip" (v5e 400, v5p 1200, v6e 800 GB/s), which is also
# the pages' "all-reduce bandwidth per Pod" over the Pod's chips (v5e 51.2 TB/s / 256);
# the v4 page gives only the latter: 1.1 PB/s / 4096 chips.
CHIPS = {
    "v4": Chip("v4", 32, 275e12, 1200e9, 1.1e15 / 4096, 3, 2, "megacore"),
    "v5p": Chip("v5p", 95, 459e12, 2765e9, 600e9, 3, 2, "megacore"),
    "v5e": Chip("v5e", 16, 197e12, 819e9, 200e9, 2, 1, "default"),
    "v6e": Chip("v6e", 32, 918e12, 1600e9, 400e9, 2, 1, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


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
    if not match or gen not in CHIPS:
        raise ValueError(
            f"--topology={name!r}: expected e.g. v4-8, v5p-128, v5e-16, v5litepod-16, v6e-64, "
            f"v5p:4x4x4 or cpu:8 (generations: {sorted(CHIPS)} and {sorted(ALIASES)})")
    chip = CHIPS[gen]
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


# Per-step costs read from the optimized per-chip HLO, loops counted (see the docstring).

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}  # and 1 for the f8 types
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
# Ops that move no HBM data of their own: aliases, control flow (its bodies are counted),
# the -done half of async pairs, and copies between HBM and on-chip memory.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "call", "conditional", "async-start", "async-update", "async-done",
               "copy-start", "copy-done", "after-all", "partition-id", "replica-id",
               "opt-barrier", "add-dependency"}


@dataclasses.dataclass(frozen=True)
class Instr:
    """One HLO instruction: `name = type opcode(operands), attrs`."""

    name: str
    type: str
    opcode: str
    operands: tuple[str, ...]  # operand names (a parameter's: its number)
    attrs: str


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes text[start]."""
    pairs, expect = {"(": ")", "{": "}", "[": "]"}, []
    for i in range(start, len(text)):
        if text[i] in pairs:
            expect.append(pairs[text[i]])
        elif expect and text[i] == expect[-1]:
            expect.pop()
            if not expect:
                return i + 1
    raise ValueError(f"unbalanced HLO: {text[start:start + 80]!r}")


def _parse_instr(line: str) -> Instr | None:
    match = re.match(r"\s+(?:ROOT )?%?([^\s=]+) = ", line)
    if not match:
        return None
    rest = line[match.end():]
    type_end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    type_str, rest = rest[:type_end], rest[type_end:].lstrip()
    open_at = rest.index("(")
    close_at = _closing(rest, open_at)
    operands = []
    for raw in re.sub(r"/\*.*?\*/", "", rest[open_at + 1:close_at - 1]).split(","):
        names = re.findall(r"%([^\s,]+)", raw)  # operands may be printed with their types
        if names or raw.strip():
            operands.append(names[-1] if names else raw.strip())
    return Instr(match.group(1), type_str, rest[:open_at], tuple(operands), rest[close_at:])


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Optimized HLO text (`compiled.as_text()`) -> ({computation: instructions, its ROOT
    last}, entry)."""
    comps: dict[str, list[Instr]] = {}
    entry, current, root = "", None, None
    for line in text.splitlines():
        if header := re.match(r"(ENTRY )?%?(\S+) \(.*\) -> .*\{$", line):
            current = comps.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.startswith("}") and current is not None:
            current += [root] if root else []
            current, root = None, None
        elif current is not None and (instr := _parse_instr(line)):
            if line.lstrip().startswith("ROOT "):
                root = instr
            else:
                current.append(instr)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def type_bytes(type_str: str) -> float:
    """Bytes of an HLO type (f32[8,128]{1,0}, or a tuple of them: summed)."""
    return sum(DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
               * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(type_str))


def type_dims(type_str: str) -> tuple[int, ...]:
    match = _ARRAY.search(type_str)
    return tuple(int(d) for d in match.group(2).split(",") if d) if match else ()


@functools.cache
def _window_taps(size_in: int, window: int, size_out: int, stride: int, pad_lo: int,
                 lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one convolution dimension that land on an
    input element, not on padding or a dilation hole. XLA:TPU writes batched matmuls as
    convolutions whose batch dimensions are "spatial" windows that are mostly padding."""
    import numpy as np
    pos = (np.arange(size_out)[:, None] * stride + np.arange(window)[None, :] * rhs_dilate
           - pad_lo)
    return int(((pos >= 0) & (pos <= (size_in - 1) * lhs_dilate)
                & (pos % lhs_dilate == 0)).sum())


def matmul_flops(instr: Instr, types: dict[str, str]) -> float:
    """FLOPs of a dot or convolution: 2 x output elements x contracted elements each."""
    out = type_dims(instr.type)
    if instr.opcode == "dot":
        lhs = type_dims(types[instr.operands[0]])
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
        k = math.prod(lhs[int(d)] for d in contracted.group(1).split(",") if d) if contracted \
            else 1
        return 2.0 * math.prod(out) * k
    if instr.opcode != "convolution":
        return 0.0
    lhs_labels, rhs_labels, out_labels = re.search(
        r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs).groups()
    lhs, rhs = type_dims(types[instr.operands[0]]), type_dims(types[instr.operands[1]])
    window = re.search(r"window=\{([^}]*)\}", instr.attrs)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
    spatial = sorted(c for c in out_labels if c.isdigit())  # window fields follow this order

    def per_dim(key: str, default: int) -> list[int]:
        if key not in fields:
            return [default] * len(spatial)
        return [int(v.split("_")[0]) for v in fields[key].split("x")]  # pad: lo_hi -> lo

    strides, pads = per_dim("stride", 1), per_dim("pad", 0)
    lhs_dilate, rhs_dilate = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    taps = math.prod(
        _window_taps(lhs[lhs_labels.index(d)], rhs[rhs_labels.index(d)],
                     out[out_labels.index(d)], strides[i], pads[i], lhs_dilate[i],
                     rhs_dilate[i]) for i, d in enumerate(spatial))
    # Each (batch, output feature) pair sums input features x valid taps.
    return (2.0 * out[out_labels.index("b")] * out[out_labels.index("f")]
            * rhs[rhs_labels.index("i")] * taps)


def group_size(instr: Instr, num_devices: int) -> int:
    """Devices in each of a collective's replica groups."""
    attrs = instr.attrs
    if mesh := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\([^)]*\))?"
                         r"(?: \{([^}]*)\})?", attrs):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        axes = re.findall(r"'([^']+)'", mesh.group(2)) if mesh.group(2) else list(sizes)
        return math.prod(int(sizes[a]) for a in axes)
    if iota := re.search(r"replica_groups=\[(\d+(?:,\d+)*)\]<=", attrs):
        return math.prod(int(d) for d in iota.group(1).split(",")[1:])
    if listed := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
        return len(listed.group(1).split(","))
    return num_devices  # replica_groups={}: one group of every device


def collective_kind(instr: Instr) -> str | None:
    """'all-gather' etc. for a collective or the -start of its async form, else None."""
    op = instr.opcode.removesuffix("-start")
    return op if op in COLLECTIVES else None


def wire_bytes(instr: Instr, kind: str, types: dict[str, str], num_devices: int) -> float:
    """Bytes one chip sends for a collective, as ring algorithms move them: an all-gather
    sends its shard to the n-1 others, a reduce-scatter or all-to-all (n-1)/n of its
    operand, an all-reduce (a reduce-scatter then an all-gather) twice that."""
    operand = sum(type_bytes(types[o]) for o in instr.operands)
    if kind == "collective-permute":
        pairs = re.findall(r"\{(\d+),(\d+)\}", instr.attrs.split("source_target_pairs=")[-1])
        moved = sum(a != b for a, b in pairs)
        return operand * moved / max(len(pairs), 1)
    n = group_size(instr, num_devices)
    return operand * {"all-gather": n - 1, "all-reduce": 2 * (n - 1) / n}.get(kind, (n - 1) / n)


@dataclasses.dataclass
class HloCost:
    """Per-chip costs of one execution of the program (a training step), loops counted."""

    matmul_flops: float = 0.0  # dots and convolutions: what the MXUs do
    hbm_bytes: float = 0.0  # operand + result bytes of the unfused (top-level) ops
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=dict)  # sent
    uncounted_loops: int = 0  # while loops without a known trip count (given one instead)

    def add(self, other: HloCost, times: float = 1.0) -> None:
        self.matmul_flops += times * other.matmul_flops
        self.hbm_bytes += times * other.hbm_bytes
        for kind, b in other.collective_bytes.items():
            self.collective_bytes[kind] = self.collective_bytes.get(kind, 0.0) + times * b
        self.uncounted_loops += other.uncounted_loops

    @property
    def ici_bytes(self) -> float:
        return sum(self.collective_bytes.values())


def _traffic_bytes(instr: Instr, comps: dict[str, list[Instr]], types: dict[str, str]
                   ) -> float:
    """HBM bytes an unfused op reads and writes: its operands and result, except that a
    slice reads only the slice and an in-place dynamic-update-slice writes only the update
    (so a scanned layer reads its own weights, not the whole stack, each iteration)."""
    if instr.opcode in _NO_TRAFFIC or instr.opcode.endswith("-done") or (
            instr.opcode == "custom-call" and "AllocateBuffer" in instr.attrs):
        return 0.0
    if instr.opcode in ("dynamic-slice", "slice"):
        return 2.0 * type_bytes(instr.type)
    if instr.opcode == "dynamic-update-slice":
        return 2.0 * type_bytes(types[instr.operands[1]])
    if instr.opcode != "fusion":
        return type_bytes(instr.type) + sum(type_bytes(types[o]) for o in instr.operands)
    body = comps[_called(instr, "calls")]
    params = {i.name: int(i.operands[0]) for i in body if i.opcode == "parameter"}
    users: dict[str, list[Instr]] = {}
    for i in body:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    root = body[-1]
    outputs = [next(i for i in body if i.name == o) for o in root.operands] \
        if root.opcode == "tuple" else [root]
    in_place = {o.operands[0] for o in outputs if o.opcode == "dynamic-update-slice"}
    read = 0.0
    for name, index in params.items():
        if name in in_place:
            continue  # the buffer updated in place: only the update is written
        uses = users.get(name, [])
        if uses and all(u.opcode in ("dynamic-slice", "slice") and u.operands[0] == name
                        for u in uses):
            read += sum(type_bytes(u.type) for u in uses)
        else:
            read += type_bytes(types[instr.operands[index]])
    written = sum(type_bytes(types.get(o.operands[1], "")) if o.opcode == "dynamic-update-slice"
                  else type_bytes(o.type) for o in outputs)
    return read + written


def _called(instr: Instr, key: str) -> str:
    return re.search(key + r"=%?([^\s,]+)", instr.attrs).group(1)


def trip_count(loop: Instr, comps: dict[str, list[Instr]], defs: dict[str, Instr]
               ) -> int | None:
    """Iterations of a while loop: XLA's `known_trip_count` where the backend prints it
    (CPU), else read off a `counter < constant` condition and the counter's constant
    initial value (TPU; jax's scans and fori_loops step by 1). None if neither."""
    if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs):
        return int(known.group(1))

    def source(name: str) -> Instr:  # through copies and bitcasts
        while defs[name].opcode in ("copy", "bitcast"):
            name = defs[name].operands[0]
        return defs[name]

    root = comps[_called(loop, "condition")][-1]
    if root.opcode != "compare" or "direction=LT" not in root.attrs:
        return None
    counter, bound = (source(o) for o in root.operands)
    init = source(loop.operands[0])
    index = re.search(r"index=(\d+)", counter.attrs)
    if (counter.opcode != "get-tuple-element" or bound.opcode != "constant" or not index
            or init.opcode != "tuple"):
        return None
    start = source(init.operands[int(index.group(1))])
    if start.opcode != "constant":
        return None
    return max(int(bound.operands[0]) - int(start.operands[0]), 0)


def hlo_cost(hlo_text: str, uncounted_trip_count: int) -> HloCost:
    """Per-chip matmul FLOPs, HBM bytes and collective bytes of one run of an optimized HLO
    module, each computation weighted by how often it runs: a while loop's body and
    condition `trip_count` times, or `uncounted_trip_count` times for a loop over a traced
    bound (the train step's microbatch loop). Conditional branches count once each."""
    comps, entry = parse_hlo(hlo_text)
    partitions = re.search(r"num_partitions=(\d+)", hlo_text.split("\n", 1)[0])
    num_devices = int(partitions.group(1)) if partitions else 1
    defs = {i.name: i for body in comps.values() for i in body}
    types = {name: i.type for name, i in defs.items()}
    memo: dict[tuple[str, bool], HloCost] = {}

    def cost(name: str, fused: bool) -> HloCost:
        if (name, fused) in memo:
            return memo[name, fused]
        total = HloCost()
        body = comps[name]
        users: dict[str, list[str]] = {}
        for instr in body:
            for o in instr.operands:
                users.setdefault(o, []).append(instr.opcode)
        for instr in body:
            total.matmul_flops += matmul_flops(instr, types)
            if kind := collective_kind(instr):
                if kind == "all-reduce" and fused and set(users.get(instr.name, [])) == {
                        "dynamic-slice"}:
                    kind = "reduce-scatter"  # XLA:TPU's all-reduce + slice fusion
                total.collective_bytes[kind] = total.collective_bytes.get(kind, 0.0) + \
                    wire_bytes(instr, kind, types, num_devices)
            if not fused:
                total.hbm_bytes += _traffic_bytes(instr, comps, types)
            if instr.opcode == "while":
                trip = trip_count(instr, comps, defs)
                total.uncounted_loops += trip is None
                for key in ("body", "condition"):
                    total.add(cost(_called(instr, key), fused),
                              uncounted_trip_count if trip is None else trip)
            else:  # fusions, calls, async wrappers, conditional branches: once each
                called = re.findall(r"(?:calls|true_computation|false_computation)=%?([^\s,}]+)",
                                    instr.attrs)
                if branches := re.search(r"branch_computations=\{([^}]*)\}", instr.attrs):
                    called += re.findall(r"%?([^\s,]+)", branches.group(1))
                for callee in called:
                    total.add(cost(callee, fused or instr.opcode == "fusion"))
        memo[name, fused] = total
        return total

    return cost(entry, False)


def abstract_inputs(trainer: loop.Trainer) -> tuple:
    """ShapeDtypeStructs (with shardings) for train_step(state, batch, rng, num_micro)."""
    cfg, mesh = trainer.cfg, trainer.mesh
    repl = sharding.replicated(mesh)
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
        "params": ckpt_lib.abstract_with_shardings(trainer.abstract_params,
                                                   trainer.param_shardings),
        "opt_state": ckpt_lib.abstract_with_shardings(trainer.abstract_opt_state,
                                                      trainer.opt_shardings)}
    m = cfg.train.microbatches
    batch_MxBxT1 = jax.ShapeDtypeStruct(
        (m, cfg.train.batch_size // m, cfg.model.context + 1), jnp.int32,
        sharding=sharding.batch_sharding(mesh, 3, batch_axis=1))
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
    num_micro = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
    return state, batch_MxBxT1, rng, num_micro


@dataclasses.dataclass
class Report:
    """What one AOT compilation says; bytes, FLOPs and seconds are per chip unless named
    total."""

    name: str
    topology: str
    num_chips: int
    mesh: dict[str, int]
    params: int
    chip: Chip | None  # None: host CPU devices
    model_flops_total: float
    microbatches: int  # the trip count given to the microbatch loop, whose bound is traced
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    cost_analysis_flops: float = 0.0  # XLA's own count: each loop body once
    hlo: HloCost | None = None  # `hlo_cost` of the compiled program: loops counted
    hlo_error: str | None = None  # why the optimized HLO could not be read back, if not
    compile_s: float = 0.0
    error: str | None = None  # the compiler's own out-of-memory message

    @property
    def hbm_bytes(self) -> float | None:
        return None if self.chip is None else self.chip.hbm_gib * GIB

    @property
    def total_bytes(self) -> int:
        """Live HBM per chip: arguments + outputs not aliased to (donated) arguments +
        temporaries + the program itself."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool | None:
        if self.error:
            return False
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    @property
    def xla_flops_total(self) -> float | None:
        """Matmul FLOPs of the compiled step over all chips, loops counted."""
        return None if self.hlo is None else self.hlo.matmul_flops * self.num_chips

    @property
    def mfu_ceiling(self) -> float | None:
        """Model / compiled matmul FLOPs: the MFU if every matmul ran at peak and nothing
        else took time."""
        return self.model_flops_total / self.xla_flops_total if self.xla_flops_total else None

    @property
    def roofline_s(self) -> dict[str, float] | None:
        """Seconds per step per chip that each resource needs at its peak rate."""
        if self.hlo is None or self.chip is None:
            return None
        return {"compute": self.hlo.matmul_flops / self.chip.peak_flops,
                "memory": self.hlo.hbm_bytes / self.chip.hbm_bw,
                "communication": self.hlo.ici_bytes / self.chip.ici_bw}

    @property
    def step_s(self) -> tuple[float, float] | None:
        """Estimated step time: (communication not overlapped: max(compute, memory) + ICI,
        communication fully overlapped: max of the three)."""
        if (t := self.roofline_s) is None:
            return None
        return (max(t["compute"], t["memory"]) + t["communication"], max(t.values()))

    @property
    def bound(self) -> str | None:
        """The resource that takes longest."""
        return None if (t := self.roofline_s) is None else max(t, key=t.__getitem__)

    @property
    def mfu_estimate(self) -> tuple[float, float] | None:
        """Model FLOPs per chip / (peak x estimated step): (no overlap, full overlap)."""
        if (step := self.step_s) is None:
            return None
        ideal_s = self.model_flops_total / self.num_chips / self.chip.peak_flops
        return ideal_s / step[0], ideal_s / step[1]


def compile_train_step(cfg: ml_collections.ConfigDict, topo: Topology,
                       devices: list | None = None) -> Report:
    """AOT-compiles `build_trainer(cfg, mesh).train_step` for `topo`; allocates nothing."""
    import time
    cfg = config_lib.validate(cfg)
    devices = topology_devices(topo) if devices is None else devices
    mesh = sharding.make_mesh(cfg, devices)
    sharding.check_batch(cfg, mesh)
    trainer = loop.build_trainer(cfg, mesh)
    n_params = model_lib.count_params(trainer.abstract_params)
    model_flops = flops_per_token(cfg.model, n_params) * cfg.train.batch_size * cfg.model.context
    report = Report(cfg.name, topo.name, len(devices), dict(mesh.shape), n_params, topo.chip,
                    model_flops, cfg.train.microbatches)
    tic = time.perf_counter()
    try:
        compiled = trainer.train_step.lower(*abstract_inputs(trainer)).compile()
    except Exception as e:  # noqa: BLE001 - XLA raises its runtime error type
        if not re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds.*memory", str(e)):
            raise
        report.error = str(e).strip().splitlines()[0][:500]
        report.compile_s = time.perf_counter() - tic
        needed = re.search(r"\(([\d.]+)([GMK])\) exceeds", str(e)) or re.search(
            r"Used ([\d.]+)([GMK])", str(e))
        if needed:  # the compiler's figure: what it could not place, a lower bound
            scale = {"G": 1e9, "M": 1e6, "K": 1e3}[needed.group(2)]
            report.temp_bytes = int(float(needed.group(1)) * scale)
        return report
    report.compile_s = time.perf_counter() - tic
    mem = compiled.memory_analysis()
    if mem is not None:
        report.argument_bytes = mem.argument_size_in_bytes
        report.output_bytes = mem.output_size_in_bytes
        report.alias_bytes = mem.alias_size_in_bytes
        report.temp_bytes = mem.temp_size_in_bytes
        report.code_bytes = mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.cost_analysis_flops = float((cost or {}).get("flops", 0.0))
    try:
        hlo_text = compiled.as_text()
    except Exception as e:  # noqa: BLE001 - jaxlib can fail to re-read libtpu's HLO proto
        report.hlo_error = str(e).strip().splitlines()[0][:300]
    else:
        report.hlo = hlo_cost(hlo_text, cfg.train.microbatches)
    return report


def suggestions(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> list[str]:
    """Settings that lower memory per chip, in the order worth trying."""
    out = []
    if not cfg.mesh.fsdp and mesh_shape.get("data", 1) > 1:
        out.append("--config.mesh.fsdp=True (params and Adam moments split over data too)")
    model = mesh_shape.get("model", 1) * 2
    m = cfg.model
    if mesh_shape.get("data", 1) % 2 == 0 and not (m.n_head % model or m.d_ff % model):
        out.append(f"--config.mesh.model={model} (tensor parallelism; vocab_size must divide)")
    if m.remat != "full":
        out.append("--config.model.remat=full (recompute each layer's forward)")
    t = cfg.train
    micro = t.microbatches * 2
    if t.batch_size % micro == 0 and (t.batch_size // micro) % mesh_shape.get("data", 1) == 0:
        out.append(f"--config.train.microbatches={micro} (smaller activations per pass)")
    out.append("a larger slice (--topology)")
    return out


def format_report(report: Report, cfg: ml_collections.ConfigDict) -> str:
    """Human-readable summary; an overflow says what to try."""
    g = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in report.mesh.items())
    lines = [f"{report.name} ({report.params / 1e6:,.1f}M params) on {report.topology}: "
             f"{report.num_chips} chips, mesh {mesh}, fsdp={cfg.mesh.fsdp}, "
             f"remat={cfg.model.remat}, microbatches={cfg.train.microbatches}; "
             f"compiled in {report.compile_s:.0f} s"]
    if report.error:
        lines.append(f"compiler ran out of memory: {report.error}")
    else:
        lines.append(
            f"memory per chip: arguments {g(report.argument_bytes)}, outputs "
            f"{g(report.output_bytes)} ({g(report.alias_bytes)} aliased to donated arguments), "
            f"temporaries {g(report.temp_bytes)}, generated code {g(report.code_bytes)}: "
            f"total {g(report.total_bytes)}")
    if report.hbm_bytes is None:
        lines.append("fits: n/a (host CPU devices have no HBM limit)")
    elif report.fits:
        lines.append(f"fits: {g(report.total_bytes)} of {g(report.hbm_bytes)} HBM per chip")
    else:
        need = f"needs {'more than ' if report.error else ''}{g(report.total_bytes)}"
        lines.append(f"does not fit: {need} per chip of {g(report.hbm_bytes)}; try:")
        lines += [f"  {s}" for s in suggestions(cfg, report.mesh)]
    if report.hlo_error:
        lines.append(f"no step estimate: the optimized HLO could not be read back "
                     f"({report.hlo_error})")
    if report.hlo is not None:
        hlo, chip = report.hlo, report.chip
        lines.append(
            f"FLOPs per step: XLA matmuls {report.xla_flops_total:.3e} "
            f"({hlo.matmul_flops:.3e} per chip, loops counted; XLA's cost analysis, which "
            f"counts each loop body once: {report.cost_analysis_flops:.3e} per chip); model "
            f"6N+attention {report.model_flops_total:.3e}; MFU ceiling (model / XLA matmul "
            f"FLOPs) {report.mfu_ceiling:.1%}")
        si = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"  # noqa: E731
        sent = ", ".join(f"{k} {si(v)}" for k, v in sorted(
            hlo.collective_bytes.items(), key=lambda kv: -kv[1]))
        lines.append(f"traffic per chip per step: HBM ~{si(hlo.hbm_bytes)}; ICI sent "
                     f"{si(hlo.ici_bytes)} ({sent or 'no collectives'})")
        if hlo.uncounted_loops:
            lines.append(f"  ({hlo.uncounted_loops} loop(s) with a traced bound, the microbatch "
                         f"loop, counted {report.microbatches} times: train.microbatches)")
        if (t := report.roofline_s) is not None and (step := report.step_s) is not None:
            lo, hi = report.mfu_estimate
            lines.append(
                f"step time estimate per chip: compute {t['compute']:.3g} s "
                f"({chip.peak_flops / 1e12:.0f} TFLOP/s), memory {t['memory']:.3g} s "
                f"({chip.hbm_bw / 1e9:.0f} GB/s), communication {t['communication']:.3g} s "
                f"({chip.ici_bw / 1e9:.0f} GB/s sent): {step[0]:.3g} s without overlap, "
                f"{step[1]:.3g} s with communication fully overlapped; {report.bound}-bound; "
                f"MFU estimate {lo:.0%}-{hi:.0%}")
    return "\n".join(lines)


# GPT-3 sizes x slices x settings that `--table` compiles: (size, topology, overrides).
# The settings are choices to try; whether they fit is what the table reports.
PAD = {"model.vocab_size": 50304}  # 50257 padded so the vocabulary splits over mesh.model
TABLE: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("small", "v5e-16", {}),
    ("xl", "v5p-32", {}),
    ("2.7b", "v5p-64", {"mesh.model": 2, **PAD}),
    ("6.7b", "v5p-128", {"mesh.model": 4, **PAD}),
    ("13b", "v5p-128", {"mesh.model": 4, "mesh.fsdp": True, **PAD}),
    ("175b", "v5p-1024", {"mesh.model": 16, "mesh.fsdp": True, "model.remat": "full",
                          "train.microbatches": 48, **PAD}),
)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py:arg` (relative to the repository) -> that file's get_config(arg)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    module_spec = importlib.util.spec_from_file_location("_experiment", os.path.join(root, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]
                    ) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_row(size: str, overrides: dict[str, Any], report: Report) -> str:
    """One markdown row of the fit table."""
    settings = ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "as in the config"
    used = f"{report.total_bytes / GIB:.1f}" if report.error is None else "> HBM"
    hbm = _fmt(report.hbm_bytes and report.hbm_bytes / GIB, ".0f")
    fits = {True: "yes", False: "**no**", None: "n/a"}[report.fits]
    step, mfu = report.step_s, report.mfu_estimate
    return (f"| {size} | {report.params / 1e9:.2f}B | {report.topology} | {report.num_chips} | "
            f"{settings} | {used} ({hbm}) | {fits} | "
            f"{_fmt(report.xla_flops_total and report.xla_flops_total / 1e12, ',.0f')} | "
            f"{report.model_flops_total / 1e12:,.0f} | {_fmt(report.mfu_ceiling, '.0%')} | "
            f"{f'{step[1]:.2f}-{step[0]:.2f}' if step else '-'} | {report.bound or '-'} | "
            f"{f'{mfu[0]:.0%}-{mfu[1]:.0%}' if mfu else '-'} |")


def write_table(path: str, cases: tuple = TABLE) -> str:
    """Compiles each case and writes the markdown table of what fits where."""
    rows = ["| model | params | slice | chips | settings | GiB per chip (of HBM) | fits | "
            "XLA TFLOP/step | model TFLOP/step | MFU ceiling | step estimate (s) | bound | "
            "MFU estimate |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    text = ""
    for size, topo_name, overrides in cases:
        cfg = apply_overrides(load_config(f"experiments/gpt3.py:{size}"), overrides)
        topo = parse_topology(topo_name)
        report = compile_train_step(cfg, topo)
        print(format_report(report, cfg), flush=True)
        rows.append(table_row(size, overrides, report))
        text = _table_text(rows)
        with open(path, "w") as f:  # rewritten after every row: slow compiles keep progress
            f.write(text)
    return text


def _table_text(rows: list[str]) -> str:
    return "\n".join([
        "# GPT-3 sizes on TPU slices (ahead-of-time compilation)",
        "",
        "Generated by `python -m gpt_jax.compile --table=docs/aot_table.md` (do not edit by "
        "hand): each row compiles the real sharded train step of `experiments/gpt3.py:<size>` "
        f"for the slice with jax {jax.__version__} and libtpu, on a machine without TPUs. "
        "Memory is XLA's per-chip total (arguments + non-aliased outputs + temporaries + "
        "code). XLA TFLOP/step: the matmul (dot and convolution) FLOPs of the compiled "
        "program over all chips, read from its optimized HLO with every loop body counted "
        "as often as it runs (the microbatch loop, whose bound is traced, as "
        "`train.microbatches`); it includes remat's recomputed forwards. Model TFLOP/step: "
        "6N + attention per token x batch tokens. MFU ceiling = model / XLA FLOPs. Step "
        "estimate: a roofline per chip from the same walk, with compute = matmul FLOPs / "
        "peak bf16 FLOP/s, memory = HBM bytes (operands + results of the unfused ops) / HBM "
        "bandwidth, communication = collective bytes a chip sends (ring algorithms) / its ICI "
        "send bandwidth over all links (Cloud TPU docs); the range runs from communication "
        "fully overlapped, max(compute, memory, communication), to not overlapped, "
        "max(compute, memory) + communication. Bound names the largest term. MFU estimate = "
        "model FLOPs / (chips x peak x step estimate), for the two ends. These are estimates "
        "from peak rates, not measurements: they leave out idle time, latency, on-chip "
        "caching and collectives that use fewer links than all, so a measured MFU will be "
        "lower. '-': jaxlib could not read the compiled HLO back from libtpu (a RET_CHECK "
        "on an async op: a version skew), so there is nothing to walk. "
        "`model.vocab_size=50304` pads GPT-3's 50257 to a multiple of `mesh.model` "
        "(the extra ids are never produced by the tokenizer).",
        "", *rows, ""])


def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("topology", None,
                        "TPU slice (v4-8, v5p-128, v5e-16, v5litepod-16, v6e-64, v5p:4x4x4) "
                        "or cpu:N.")
    flags.DEFINE_string("table", None, "Write the GPT-3 fit table (markdown) to this path.")


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    if f.table:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices; run nothing
        write_table(f.table)
        return
    if f.config is None or f.topology is None:
        raise app_usage_error("--config and --topology are required (or --table)")
    topo = parse_topology(f.topology)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chips to lock
    if topo.chip is None:
        jax.config.update("jax_num_cpu_devices", topo.num_chips)
    jax.config.update("jax_platforms", "cpu")
    try:
        report = compile_train_step(f.config, topo)
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")
    print(format_report(report, f.config))
    if report.fits is False:
        sys.exit(1)


def app_usage_error(message: str) -> Exception:
    from absl import app
    return app.UsageError(message)


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
