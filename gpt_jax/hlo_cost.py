"""Per-step costs read from an optimized per-chip HLO module, every loop counted.

XLA's `cost_analysis()` counts the body of a loop once, and the GPT-3 steps loop
(`model.scan_layers`, `train.microbatches` > 1), so `hlo_cost` walks the optimized
HLO text (`compiled.as_text()`) and weighs each computation by the trip counts of
the loops around it: XLA's `known_trip_count` where printed (CPU), else the loop
condition's `counter < constant` (TPU). A loop over a traced bound (the microbatch
loop: the batch ramp) is counted as often as the caller says. Per chip it sums:
- matmul FLOPs: dots and convolutions (2 x output x contracted elements; XLA:TPU
  writes batched matmuls as convolutions whose windows are mostly padding, so
  only taps on real elements count), and the Pallas splash attention kernels (custom
  calls XLA cannot see into: their matmuls over the blocks their mask visits, see
  `splash_flops`). Elementwise work is left out; on an unrolled step this is a few
  percent under `cost_analysis()["flops"]`;
- HBM bytes: operands + results of the unfused ops (a fusion as one op; slices
  and in-place updates count only the slice), a rough figure that ignores
  on-chip reuse;
- ICI bytes a chip sends per collective, as ring algorithms move them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable

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


_INSTR_START = re.compile(r"\s+(?:ROOT )?%?([^\s=]+) = ")


def _parse_instr(line: str) -> Instr | None:
    match = _INSTR_START.match(line)
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
    last}, entry). An instruction may span lines (Pallas kernels print their metadata as
    multi-line JSON); a computation ends at a line that is only `}`."""
    comps: dict[str, list[Instr]] = {}
    entry, current, root, pending = "", None, None, ""

    def flush() -> None:
        nonlocal root
        if pending and (instr := _parse_instr(pending)):
            if pending.lstrip().startswith("ROOT "):
                root = instr
            else:
                current.append(instr)

    for line in text.splitlines():
        if current is None:
            if header := re.match(r"(ENTRY )?%?(\S+) \(.*\) -> .*\{$", line):
                current = comps.setdefault(header.group(2), [])
                entry = header.group(2) if header.group(1) else entry
        elif line.rstrip() == "}":
            flush()
            current += [root] if root else []
            current, root, pending = None, None, ""
        elif _INSTR_START.match(line):
            flush()
            pending = line
        else:
            pending += "\n" + line
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


# Matmuls per visited block pair of the splash kernels (jax's splash_attention_kernel):
# forward QK^T and PV; dq: QK^T again, dO V^T and dS K; dkv: QK^T, P^T dO, dO V^T, dS^T Q.
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_BLOCKS = {"fwd": ("block_q", "block_kv"), "dq": ("block_q_dq", "block_kv_dq"),
                  "dkv": ("block_q_dkv", "block_kv_dkv")}


def splash_block_pairs(length: int, window: int | None, block_q: int, block_kv: int) -> int:
    """(query block, key block) pairs of a length x length causal mask (banded: query i
    sees keys i-window+1 .. i) that hold a visible element: those the kernel computes."""
    import numpy as np
    q_lo = np.arange(length // block_q)[:, None] * block_q
    k_lo = np.arange(length // block_kv)[None, :] * block_kv
    visible = k_lo <= q_lo + block_q - 1  # some key at or before some query
    if window is not None:
        visible &= k_lo + block_kv - 1 >= q_lo - (window - 1)
    return int(visible.sum())


def splash_flops(instr: Instr, types: dict[str, str]) -> float:
    """Matmul FLOPs of a Pallas splash attention kernel, a custom call XLA cannot see into:
    2 x block_q x block_kv x head_dim per matmul, per visited block pair, head and
    sequence. Its q operand is [batch x] heads x T x head_dim; the mask comes from the
    named scope `attention.splash_causal` puts around it (`splash_causal` or
    `splash_band<window>`), the block sizes from the kernel's metadata. 0 for any other
    op."""
    op = re.search(r'op_name="([^"]*)"', instr.attrs)
    kind = instr.opcode == "custom-call" and op and re.search(
        r"splash_mha_(fwd|dq|dkv)", op.group(1))
    if not kind:
        return 0.0
    band = re.search(r"splash_band(\d+)", op.group(1))
    names = _SPLASH_BLOCKS[kind.group(1)]
    blocks = [int(re.search(rf'\\?"{n}\\?": (\d+)', instr.attrs).group(1)) for n in names]
    # q: [batch,] heads, T, head_dim (XLA drops a batch of 1), the first float operand
    # (the integer mask tables come before it)
    *batch, h, t, d = next(dims for o in instr.operands if types[o].startswith(("f", "bf"))
                           and len(dims := type_dims(types[o])) >= 3)
    b = math.prod(batch)
    pairs = splash_block_pairs(t, int(band.group(1)) if band else None, *blocks)
    return 2.0 * SPLASH_MATMULS[kind.group(1)] * blocks[0] * blocks[1] * d * pairs * b * h


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
    (CPU), else read off a `counter < constant` condition, the counter's constant initial
    value and its step: the constant the body adds to it (TPU; jax's scans and fori_loops
    step by 1, XLA:TPU's windowed-einsum loops, unrolled twice, by 2). None if the bound
    or start cannot be read."""
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
    span = max(int(bound.operands[0]) - int(start.operands[0]), 0)
    step = _counter_step(comps[_called(loop, "body")], int(index.group(1)), source)
    return -(-span // step)


def _counter_step(body: list[Instr], index: int, source: Callable[[str], Instr]) -> int:
    """The constant the loop body adds to tuple element `index` (its counter); 1 if the
    update is not `counter + constant`."""
    root = body[-1]
    if root.opcode != "tuple" or index >= len(root.operands):
        return 1
    update = source(root.operands[index])
    if update.opcode != "add":
        return 1
    a, b = (source(o) for o in update.operands)
    counter, step = (a, b) if b.opcode == "constant" else (b, a)
    counter_index = re.search(r"index=(\d+)", counter.attrs)
    if (step.opcode != "constant" or counter.opcode != "get-tuple-element"
            or not counter_index or int(counter_index.group(1)) != index):
        return 1
    return max(int(step.operands[0]), 1)


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
            total.matmul_flops += matmul_flops(instr, types) + splash_flops(instr, types)
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


def loop_depths(hlo_text: str) -> list[tuple[int, Instr]]:
    """Every instruction of an optimized HLO module with the number of while loops around
    it (0: runs once per step): what the HLO tests read to say where a collective or a
    convert happens, e.g. a layer's weight gather inside the scanned layer loop."""
    comps, entry = parse_hlo(hlo_text)
    depth: dict[str, int] = {}

    def walk(name: str, d: int) -> None:
        if depth.get(name, -1) >= d:
            return
        depth[name] = d
        for instr in comps[name]:
            called = re.findall(r"(?:calls|body|condition|to_apply|true_computation|"
                                r"false_computation)=%?([^\s,}]+)", instr.attrs)
            if branches := re.search(r"branch_computations=\{([^}]*)\}", instr.attrs):
                called += re.findall(r"%?([^\s,]+)", branches.group(1))
            for callee in called:
                if callee in comps:
                    walk(callee, d + (instr.opcode == "while"))

    walk(entry, 0)
    return [(d, instr) for name, d in depth.items() for instr in comps[name]]
