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

The costs of one step come from `hlo_cost.hlo_cost`, a walk of the optimized
per-chip HLO that counts every loop as often as it runs (XLA's own
`cost_analysis()` counts a loop body once); the microbatch loop, whose bound is
traced (the batch ramp), is counted `train.microbatches` times, the full batch.
Then, with the chip's peak bf16 FLOP/s, HBM bandwidth and ICI send bandwidth
(all links; `chips.CHIPS`), compute, memory and communication
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
import os
import re
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gpt_jax import attention, loop, sharding
from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax.chips import Chip, Topology, parse_topology, topology_devices
from gpt_jax.flops import flops_per_token
from gpt_jax.hlo_cost import HloCost, hlo_cost

GIB = 1024**3


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


def abstract_eval_inputs(trainer: loop.Trainer) -> tuple:
    """ShapeDtypeStructs (with shardings) for eval_step(params, windows_BxT1): one
    microbatch of windows, the params sharded as in training."""
    cfg = trainer.cfg
    params = ckpt_lib.abstract_with_shardings(trainer.abstract_params, trainer.param_shardings)
    windows_BxT1 = jax.ShapeDtypeStruct(
        (cfg.train.batch_size // cfg.train.microbatches, cfg.model.context + 1), jnp.int32,
        sharding=sharding.batch_sharding(trainer.mesh, 2))
    return params, windows_BxT1


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
    attention: str = "xla"  # the attention kernel the step runs (attention.choose)
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    cost_analysis_flops: float = 0.0  # XLA's own count: each loop body once
    hlo: HloCost | None = None  # `hlo_cost` of the compiled program: loops counted
    hlo_error: str | None = None  # why the optimized HLO could not be read back, if not
    hlo_text: str | None = dataclasses.field(default=None, repr=False)  # for HLO checks
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


_VALUE = re.compile(r"^ value: <\d+ ([^ @]+) @\d+> \(size=(\d+),offset=\d+\): "
                    r"(\w+\[[\d,]*\])(\{[^}]*\})?")


def memory_breakdown(dump_dir: str, top: int = 12) -> list[tuple[int, int, str, str]]:
    """The largest values in the temporaries, from the buffer assignment XLA dumps
    (`compile_train_step(dump_dir=...)`): (bytes each, how many, op, shape), grouped by op
    (its name without the .N suffix and tuple index) and shape, largest first; a shape in
    another memory space than HBM carries its `S(n)` (XLA:TPU's on-chip spaces). Values
    not live at the same time share offsets, so the rows sum to more than the
    temporaries; tuples (pointer tables) are left out."""
    names = sorted(n for n in os.listdir(dump_dir)
                   if n.endswith("after_optimizations-buffer-assignment.txt"))
    if not names:
        return []
    groups: dict[tuple[str, str, int], int] = {}
    in_temp = False
    with open(os.path.join(dump_dir, names[-1])) as f:
        for line in f:
            if line.startswith("allocation "):
                in_temp = "preallocated-temp" in line
            elif in_temp and (value := _VALUE.match(line)):
                op = re.sub(r"(\.\d+)?(\{[\d,]*\})?$", "", value.group(1))
                space = re.search(r"S\((\d+)\)", value.group(4) or "")
                shape = value.group(3) + (f" S({space.group(1)})" if space else "")
                key = (op, shape, int(value.group(2)))
                groups[key] = groups.get(key, 0) + 1
    rows = sorted(((size, n, op, shape) for (op, shape, size), n in groups.items()),
                  key=lambda r: -r[0] * r[1])
    return rows[:top]


def compile_train_step(cfg: ml_collections.ConfigDict, topo: Topology,
                       devices: list | None = None, dump_dir: str | None = None) -> Report:
    """AOT-compiles `build_trainer(cfg, mesh).train_step` for `topo`; allocates nothing.
    With `dump_dir`, XLA writes its buffer assignment there (`memory_breakdown`)."""
    import time
    cfg = config_lib.validate(cfg)
    devices = topology_devices(topo) if devices is None else devices
    mesh = sharding.make_mesh(cfg, devices)
    sharding.check_batch(cfg, mesh)
    trainer = loop.build_trainer(cfg, mesh)
    n_params = model_lib.count_params(trainer.abstract_params)
    model_flops = flops_per_token(cfg.model, n_params) * cfg.train.batch_size * cfg.model.context
    m = cfg.model
    kernel = attention.choose(m.attention_impl, platform="cpu" if topo.chip is None else "tpu",
                              dtype=model_lib.DTYPES[m.dtype], head_dim=m.d_model // m.n_head,
                              dropout=m.attn_pdrop > 0)
    report = Report(cfg.name, topo.name, len(devices), dict(mesh.shape), n_params, topo.chip,
                    model_flops, cfg.train.microbatches, kernel)
    tic = time.perf_counter()
    try:
        options = {} if dump_dir is None else {
            "xla_dump_to": dump_dir, "xla_dump_hlo_module_re": ".*train_step.*"}
        compiled = trainer.train_step.lower(*abstract_inputs(trainer)).compile(
            compiler_options=options or None)
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
        report.hlo_text = hlo_text
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
             f"remat={cfg.model.remat}, microbatches={cfg.train.microbatches}, "
             f"attention {report.attention}; compiled in {report.compile_s:.0f} s"]
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


def format_breakdown(rows: list[tuple[int, int, str, str]], report: Report) -> str:
    """`memory_breakdown`'s rows under the temporaries' total."""
    if not rows:
        return "memory breakdown: XLA wrote no buffer assignment (out of memory?)"
    lines = [f"largest values in the temporaries ({report.temp_bytes / 2**20:,.1f} MiB; "
             "values not live together share space, so rows sum to more):"]
    lines += [f"  {size * n / 2**20:10,.1f} MiB  {n:3d} x {shape:<28} {op}"
              for size, n, op, shape in rows]
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


KERNELS = ("xla", "splash")  # model.attention_impl values each case is compiled with


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
            f"{settings} | {report.attention} | {used} ({hbm}) | {fits} | "
            f"{_fmt(report.xla_flops_total and report.xla_flops_total / 1e12, ',.0f')} | "
            f"{report.model_flops_total / 1e12:,.0f} | {_fmt(report.mfu_ceiling, '.0%')} | "
            f"{f'{step[1]:.2f}-{step[0]:.2f}' if step else '-'} | {report.bound or '-'} | "
            f"{f'{mfu[0]:.0%}-{mfu[1]:.0%}' if mfu else '-'} |")


def write_table(path: str, cases: tuple = TABLE, kernels: tuple[str, ...] = KERNELS) -> str:
    """Compiles each case with each attention kernel and writes the markdown table of
    what fits where."""
    rows = ["| model | params | slice | chips | settings | attention | GiB per chip (of HBM) | "
            "fits | XLA TFLOP/step | model TFLOP/step | MFU ceiling | step estimate (s) | "
            "bound | MFU estimate |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    text = ""
    for size, topo_name, overrides in cases:
        for kernel in kernels:
            cfg = apply_overrides(load_config(f"experiments/gpt3.py:{size}"),
                                  {**overrides, "model.attention_impl": kernel})
            report = compile_train_step(cfg, parse_topology(topo_name))
            print(format_report(report, cfg), flush=True)
            rows.append(table_row(size, overrides, report))
            text = with_notes(_table_text(rows), path)
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
        "code). Attention: the kernel each layer runs (`model.attention_impl`; `splash` is "
        "the Pallas splash flash-attention kernel, `xla` materialises every head's T x T "
        "scores). XLA TFLOP/step: the matmul (dot and convolution) FLOPs of the compiled "
        "program over all chips, plus the splash kernels' matmuls over the blocks their "
        "masks visit (`hlo_cost.splash_flops`), read from its optimized HLO with every loop "
        "body counted "
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


NOTES_MARKER = "<!-- Written by hand below this line; --table keeps it. -->"


def with_notes(text: str, path: str) -> str:
    """`text` followed by the hand-written notes of the existing file at `path`, if any."""
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        return text
    return text + old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else text


def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("topology", None,
                        "TPU slice (v4-8, v5p-128, v5e-16, v5litepod-16, v6e-64, v5p:4x4x4) "
                        "or cpu:N.")
    flags.DEFINE_string("table", None, "Write the GPT-3 fit table (markdown) to this path.")
    flags.DEFINE_integer("memory_breakdown", 0, "Also print the N largest values in the "
                         "temporaries (XLA's buffer assignment), by op and shape.")
    flags.DEFINE_list("table_kernels", list(KERNELS),
                      "--table: the model.attention_impl values each case is compiled with.")


def required_slice(f: Any) -> Topology:
    """The slice of --topology, once both --config and --topology are given (compile's and
    plan's shared flags); `cli.UsageError` naming the missing or unparsable flag."""
    from gpt_jax import cli
    missing = [name for name in ("config", "topology") if f[name].value is None]
    if missing:
        raise cli.UsageError(f"{' and '.join(f'--{m}' for m in missing)} required (e.g. "
                             "--config=experiments/gpt3.py:6.7b --topology=v5p-128), or "
                             "--table=FILE")
    try:
        topo = parse_topology(f.topology)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    return topo


def check_flags(f: Any) -> Topology | None:
    """The command line checked before anything is compiled (a bad value raises
    `cli.UsageError` naming the flag, a bad config field `ConfigError`): the slice, or
    None for --table."""
    from gpt_jax import cli
    if not f.table_kernels or any(k not in KERNELS for k in f.table_kernels):
        raise cli.UsageError(f"--table_kernels={','.join(f.table_kernels)}: each must be "
                             f"one of {', '.join(KERNELS)}")
    if f.table:
        cli.check_output_file("--table", f.table)
        return None
    topo = required_slice(f)
    if topo.num_chips < 1:
        raise cli.UsageError(f"--topology={f.topology}: needs at least 1 device")
    config_lib.validate(f.config)
    return topo


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    topo = check_flags(f)  # bad values fail before anything is compiled
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chips to lock
    if topo is None:
        jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices; run nothing
        write_table(f.table, kernels=tuple(f.table_kernels))
        return
    if topo.chip is None:
        jax.config.update("jax_num_cpu_devices", topo.num_chips)
    jax.config.update("jax_platforms", "cpu")
    with tempfile.TemporaryDirectory() as dump_dir:
        report = compile_train_step(f.config, topo,
                                    dump_dir=dump_dir if f.memory_breakdown else None)
        print(format_report(report, f.config))
        if f.memory_breakdown:
            print(format_breakdown(memory_breakdown(dump_dir, f.memory_breakdown), report))
    if report.fits is False:
        sys.exit(1)  # the report above says why and what to try


if __name__ == "__main__":
    from gpt_jax import cli
    define_flags()
    cli.run(main)
