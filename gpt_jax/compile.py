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
whether it fits; then FLOPs. Figures, per optimizer step:
- model FLOPs: `flops.flops_per_token` (6N + attention) x batch tokens, the
  numerator of the trainer's MFU;
- XLA FLOPs: `compiled.cost_analysis()` of the per-chip program x chips, which
  also counts rematerialised forwards, the optimizer and elementwise work;
- compute-bound step time: XLA FLOPs per chip / the chip's peak bf16 FLOP/s, a
  lower bound (it ignores memory bandwidth, communication and idle time);
- MFU ceiling: model FLOPs / XLA FLOPs, the MFU the step would reach if every
  FLOP XLA scheduled ran at peak. Measured MFU can only be lower.
XLA's cost analysis counts the body of a loop once, so when the step loops
(`model.scan_layers`, `train.microbatches` > 1, as the GPT-3 configs do) its
FLOPs are not a per-step total: then no MFU ceiling is given and the step time
printed is the model FLOPs' time at 100% MFU.

`--table=docs/aot_table.md` compiles the GPT-3 sizes on the slices and settings
listed in `TABLE` and writes the markdown table of what fits.
"""

from __future__ import annotations

import dataclasses
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
    """One TPU generation: HBM per chip, peak dense bf16 FLOP/s, topology layout."""

    name: str  # the generation in topology names: 'v4', 'v5p', 'v5e', 'v6e'
    hbm_gib: float
    peak_flops: float
    dims: int  # 3 for the 3D tori (v4, v5p), 2 for the 2D pods (v5e, v6e)
    cores_per_chip: int  # the number in 'v5p-128' counts TensorCores: 2 per megacore chip
    chip_config: str


CHIPS = {
    "v4": Chip("v4", 32, 275e12, 3, 2, "megacore"),
    "v5p": Chip("v5p", 95, 459e12, 3, 2, "megacore"),
    "v5e": Chip("v5e", 16, 197e12, 2, 1, "default"),
    "v6e": Chip("v6e", 32, 918e12, 2, 1, "default"),
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
    """What one AOT compilation says; bytes and FLOPs are per chip unless named total."""

    name: str
    topology: str
    num_chips: int
    mesh: dict[str, int]
    params: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: float | None
    xla_flops: float  # per chip
    model_flops_total: float
    peak_flops: float | None
    compile_s: float
    loops: bool = False  # scanned layers or a microbatch loop: XLA counts each body once
    error: str | None = None  # the compiler's own out-of-memory message

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
    def step_time_bound_s(self) -> float | None:
        """Compute-bound step time at peak: XLA FLOPs per chip / peak (model FLOPs per
        chip / peak, i.e. the time at 100% MFU, when loops make XLA's count partial)."""
        if not self.peak_flops:
            return None
        if self.loops:
            return self.model_flops_total / self.num_chips / self.peak_flops
        return self.xla_flops / self.peak_flops

    @property
    def mfu_ceiling(self) -> float | None:
        if self.loops:
            return None
        xla_total = self.xla_flops * self.num_chips
        return self.model_flops_total / xla_total if xla_total else None


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
    chip = topo.chip
    report = Report(cfg.name, topo.name, len(devices), dict(mesh.shape), n_params,
                    0, 0, 0, 0, 0, None if chip is None else chip.hbm_gib * GIB, 0.0,
                    model_flops, None if chip is None else chip.peak_flops, 0.0,
                    loops=bool(cfg.model.scan_layers or cfg.train.microbatches > 1))
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
    report.xla_flops = float((cost or {}).get("flops", 0.0))
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
    if not report.error:
        xla_total = report.xla_flops * report.num_chips
        lines.append(f"FLOPs per step: XLA {xla_total:.3e} ({report.xla_flops:.3e} per chip); "
                     f"model 6N+attention {report.model_flops_total:.3e}")
        if report.loops:
            lines.append(
                "  (XLA's cost analysis counts the body of each loop once, and this step "
                "loops over scanned layers and/or microbatches: XLA's figure is not a per-step "
                "total, so no MFU ceiling; compile with model.scan_layers=False and "
                "train.microbatches=1 for a full count)")
            if report.step_time_bound_s is not None:
                lines.append(f"step time at 100% MFU (model FLOPs at {report.peak_flops / 1e12:.0f}"
                             f" TFLOP/s per chip): {report.step_time_bound_s:.3f} s")
        elif report.step_time_bound_s is not None and report.mfu_ceiling is not None:
            lines.append(
                f"compute-bound step time at peak ({report.peak_flops / 1e12:.0f} TFLOP/s "
                f"per chip): {report.step_time_bound_s:.3f} s; MFU ceiling (model / XLA "
                f"FLOPs) {report.mfu_ceiling:.1%}: the MFU if every XLA FLOP ran at peak")
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
    ok = report.error is None
    counted = ok and not report.loops  # XLA's FLOPs are a per-step total
    xla_total = report.xla_flops * report.num_chips
    settings = ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "as in the config"
    used = f"{report.total_bytes / GIB:.1f}" if ok else "> HBM"
    hbm = _fmt(report.hbm_bytes and report.hbm_bytes / GIB, ".0f")
    fits = {True: "yes", False: "**no**", None: "n/a"}[report.fits]
    return (f"| {size} | {report.params / 1e9:.2f}B | {report.topology} | {report.num_chips} | "
            f"{settings} | {used} ({hbm}) | {fits} | "
            f"{_fmt(xla_total / 1e12 if counted else None, ',.0f')} | "
            f"{report.model_flops_total / 1e12:,.0f} | "
            f"{_fmt(report.step_time_bound_s if ok else None, '.2f')} | "
            f"{_fmt(report.mfu_ceiling if counted else None, '.0%')} |")


def write_table(path: str, cases: tuple = TABLE) -> str:
    """Compiles each case and writes the markdown table of what fits where."""
    rows = ["| model | params | slice | chips | settings | GiB per chip (of HBM) | fits | "
            "XLA TFLOP/step | model TFLOP/step | compute-bound step (s) | MFU ceiling |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
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
        "code). XLA TFLOP/step is the compiled program's count over all chips (remat, "
        "optimizer and elementwise work included); model TFLOP/step is 6N + attention per "
        "token x batch tokens. Compute-bound step is XLA FLOPs per chip / peak bf16 FLOP/s, "
        "a lower bound; MFU ceiling = model / XLA FLOPs, the MFU if every XLA FLOP ran at "
        "peak. Where the step loops (scanned layers, microbatches) XLA counts each loop body "
        "once, so those two columns read '-' and the step time is the model FLOPs' time at "
        "100% MFU. `model.vocab_size=50304` pads GPT-3's 50257 to a multiple of `mesh.model` "
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
