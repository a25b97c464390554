"""`python -m gpt_jax.plan --config=experiments/gpt3.py:6.7b --topology=v5p-128`: the
fastest layout that fits, found by compiling the candidates ahead of time.

1. Enumerate (`candidates`): model-parallel degrees that divide the chips, the heads and
   the vocabulary (padded to a multiple of 128 x degree when it does not divide), FSDP
   on/off, the remat policies, microbatch counts that keep the global batch and divide
   over the data axis, and the attention kernel (XLA; splash with 512 or 1024 blocks,
   unless attention dropout is on: the kernels have none, and dropout is the recipe's).
   `model.scan_layers` stays as the config has it unless `--scan_layers=both` (unrolled
   GPT-3 steps take hours to compile), as do dtypes and the batch.
2. Prune before compiling (`state_bytes`): a layout whose float32 params + Adam moments
   alone exceed the HBM left after the headroom is never compiled.
3. Compile the rest with `compile.compile_train_step` in worker processes (spawned, each
   with its own compile-only libtpu), cheapest-looking first, within `--budget_s` and
   `--max_candidates`; results are cached on disk, keyed by the config with the layout
   applied, the topology and the jax and libtpu versions.
4. Keep what fits in XLA's memory analysis with `--headroom` of HBM to spare; rank by the
   roofline step estimate (`compile.Report.step_s`, the no-overlap end); print the table,
   the estimate's terms and blind spots, ties within its error, and last the winner's
   `--config.*` line. `--out=plan.json` writes the same for machines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Any

import jax
import ml_collections

from gpt_jax import compile as compile_lib
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax.chips import Topology, parse_topology

GIB = 1024**3
REMATS = ("none", "dots_with_no_batch_dims_saveable", "dots_saveable", "full")
# (attention_impl, splash block size): the kernels tried on TPUs
KERNELS = (("splash", 512), ("splash", 1024), ("xla", None))
# float32 params + Adam's two float32 moments; Muon keeps one moment for the hidden matrices,
# so 8 bytes is its lower bound (its embeddings keep Adam's two)
STATE_BYTES_PER_PARAM = {"adamw": 12, "muon": 8}
# How far apart two step estimates must be before one is called faster: the roofline's
# error against measured steps is not known better than this (README, AOT notes).
ESTIMATE_ERROR = 0.15
FOOTER = (
    "Step estimate per chip = max(compute, HBM) + ICI (the no-overlap end; the range runs "
    "to max of the three): compute = matmul FLOPs of the compiled step (remat's recompute "
    "included, every loop counted) / peak bf16 FLOP/s; HBM = operand + result bytes of the "
    "unfused ops / HBM bandwidth; ICI = bytes a chip sends in its collectives (ring "
    "algorithms) / its ICI send bandwidth over all links. MFU estimate = model FLOPs "
    "(6N' + 12 L d A, gpt_jax.flops) / (chips x peak x step). Blind spots: idle and launch "
    "time, collective latency, on-chip reuse (HBM bytes are an upper bound), collectives "
    "that use one mesh axis's links rather than all, host input and checkpoints; measured "
    "MFU falls below the estimate. Layouts within {err:.0%} of each other are not ranked "
    "apart.")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout: the config overrides it applies."""

    overrides: tuple[tuple[str, Any], ...]

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.overrides)

    def line(self) -> str:
        """The `--config.*` flags that select this layout."""
        return " ".join(f"--config.{k}={v}" for k, v in self.overrides)

    def label(self) -> str:
        s = self.settings
        kernel = s["model.attention_impl"] + (
            f"/{s['model.splash_block_q']}" if s["model.attention_impl"] == "splash" else "")
        scan = {True: " scanned", False: " unrolled"}.get(s.get("model.scan_layers"), "")
        return (f"model={s['mesh.model']} fsdp={s['mesh.fsdp']} remat={s['model.remat']} "
                f"micro={s['train.microbatches']} {kernel}{scan}")


def padded_vocab(vocab: int, model: int) -> int:
    """The vocabulary rounded up so it splits over `model` in whole 128-lane rows."""
    step = 128 * model
    return vocab if vocab % model == 0 else -(-vocab // step) * step


def candidates(cfg: ml_collections.ConfigDict, topo: Topology,
               both_scans: bool = False) -> list[Candidate]:
    """Every layout worth compiling for `cfg` on `topo` (module docstring, step 1); with
    `both_scans`, each with scanned and with unrolled layers (a `model.scan_layers`
    override on every candidate), where the model can scan (alternating attention scans
    dense/banded pairs: an even layer count)."""
    m, t, n = cfg.model, cfg.train, topo.num_chips
    scans: tuple[bool | None, ...] = (None,)
    if both_scans:
        can_scan = m.attention_pattern != "alternating" or m.n_layer % 2 == 0
        scans = (False, True) if can_scan else (False,)
    out = []
    models = [d for d in (2**i for i in range(int(math.log2(n)) + 1)) if m.n_head % d == 0]
    # the kernels have no attention dropout: with it on, splash would compile the XLA path
    kernels = [k for k in KERNELS if k[0] == "xla" or not m.get("attn_pdrop", 0.0)]
    for model, fsdp, remat, (kernel, block), scan in itertools.product(
            models, (False, True), REMATS, kernels, scans):
        data = n // model
        if fsdp and data == 1:
            continue
        if kernel == "splash" and block > m.context and block != KERNELS[0][1]:
            continue  # blocks are capped at the context: a duplicate of the smaller
        for micro in (2**i for i in range(int(math.log2(t.batch_size)) + 1)):
            if t.batch_size % micro or (t.batch_size // micro) % data:
                continue
            overrides = [("mesh.data", -1), ("mesh.model", model), ("mesh.fsdp", fsdp),
                         ("model.remat", remat), ("train.microbatches", micro),
                         ("model.attention_impl", kernel)]
            if kernel == "splash":
                overrides += [("model.splash_block_q", block), ("model.splash_block_kv", block)]
            if padded_vocab(m.vocab_size, model) != m.vocab_size:
                overrides.append(("model.vocab_size", padded_vocab(m.vocab_size, model)))
            if scan is not None:
                overrides.append(("model.scan_layers", scan))
            out.append(Candidate(tuple(overrides)))
    return out


def state_bytes(cfg: ml_collections.ConfigDict, topo: Topology, cand: Candidate,
                n_params: int) -> float:
    """Params + optimizer moments per chip (float32): split over `model`, and over `data`
    too under FSDP. A lower bound on what the step needs (no activations, no gradients)."""
    s = cand.settings
    n = n_params + (s.get("model.vocab_size", cfg.model.vocab_size) - cfg.model.vocab_size
                    ) * cfg.model.d_model
    per_param = STATE_BYTES_PER_PARAM[cfg.optim.get("optimizer", "adamw")]
    return n * per_param / (topo.num_chips if s["mesh.fsdp"] else s["mesh.model"])


# Activation bytes kept per token per layer, in units of d_model, by remat policy:
# Korthikanti et al. 2022 (eq. 2, tensor parallel t): 10 + 24/t without recompute, plus
# 5 a T / (d t) for XLA attention's scores; full recompute keeps the layer input (2).
# The dots-saveable policies sit between (a guess: 10 + 12/t). Only the compile order
# uses these; whether a layout fits is XLA's call.
def activation_bytes(cfg: ml_collections.ConfigDict, topo: Topology, cand: Candidate) -> float:
    """A rough per-chip activation estimate for one microbatch (compile order only)."""
    s, m = cand.settings, cfg.model
    t = s["mesh.model"]
    tokens = cfg.train.batch_size // s["train.microbatches"] // (topo.num_chips // t) * m.context
    per_layer = {"none": 10 + 24 / t, "full": 2.0}.get(s["model.remat"], 10 + 12 / t)
    if s["model.attention_impl"] == "xla" and s["model.remat"] != "full":
        per_layer += 5 * m.n_head * m.context / (m.d_model * t)
    logits = 8 * s.get("model.vocab_size", m.vocab_size) / t  # float32 logits and their grad
    return tokens * (m.n_layer * m.d_model * per_layer + logits)


REMAT_COST = {"none": 1.0, "dots_with_no_batch_dims_saveable": 1.05, "dots_saveable": 1.05,
              "full": 4 / 3}  # the recomputed forward: one more of the 3 passes


def order_key(cfg: ml_collections.ConfigDict, topo: Topology, cand: Candidate,
              n_params: int) -> tuple:
    """Compile order under a budget: layouts that look like they fit first, then by a guess
    at their speed (remat's recompute, microbatch loop overhead, splash before XLA)."""
    s = cand.settings
    per_param = STATE_BYTES_PER_PARAM[cfg.optim.get("optimizer", "adamw")]
    est = state_bytes(cfg, topo, cand, n_params) * (per_param + 4) / per_param  # + f32 grads
    fits = est + activation_bytes(cfg, topo, cand) <= topo.chip.hbm_gib * GIB
    speed = (REMAT_COST[s["model.remat"]] * (1 + 0.02 * s["train.microbatches"])
             * (1 + 0.05 * (s["model.attention_impl"] == "xla")) * (1 + 0.02 * s["mesh.model"]))
    return (not fits, speed, s["mesh.fsdp"], -s.get("model.splash_block_q", 0))


def libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(cfg: ml_collections.ConfigDict, topo_name: str) -> str:
    """sha256 of the config with the layout applied, the topology and the versions."""
    blob = json.dumps([cfg.to_dict(), topo_name, jax.__version__, libtpu_version()],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclasses.dataclass
class Result:
    """What a compile says about one candidate (per chip)."""

    line: str
    label: str
    total_bytes: float = 0.0
    hbm_bytes: float = 0.0
    step_s: tuple[float, float] | None = None  # (no overlap, full overlap)
    mfu: tuple[float, float] | None = None
    bound: str | None = None
    tokens_per_chip: tuple[float, float] | None = None  # tokens/s per chip, both ends
    compile_s: float = 0.0
    error: str | None = None  # out of memory in the compiler, or why it failed
    cached: bool = False

    def fits(self, headroom: float) -> bool:
        return self.error is None and self.total_bytes <= (1 - headroom) * self.hbm_bytes


def result_of(report: compile_lib.Report, line: str, label: str, tokens: int) -> Result:
    step = report.step_s
    return Result(line, label, float(report.total_bytes),
                  float(report.hbm_bytes or 0.0), step, report.mfu_estimate, report.bound,
                  None if step is None else (tokens / report.num_chips / step[0],
                                             tokens / report.num_chips / step[1]),
                  report.compile_s, report.error or report.hlo_error)


def _compile_worker(args: tuple[dict, str, tuple]) -> dict:
    """In a spawned worker: compile one candidate, return its Result as a dict."""
    cfg_dict, topo_name, overrides = args
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chips
    jax.config.update("jax_platforms", "cpu")
    cand = Candidate(overrides)
    cfg = compile_lib.apply_overrides(ml_collections.ConfigDict(cfg_dict), cand.settings)
    try:
        report = compile_lib.compile_train_step(cfg, parse_topology(topo_name))
    except Exception as e:  # noqa: BLE001 - a failed candidate is a row, not the end
        return dataclasses.asdict(Result(cand.line(), cand.label(),
                                         error=f"{type(e).__name__}: {str(e)[:300]}"))
    return dataclasses.asdict(result_of(report, cand.line(), cand.label(),
                                        cfg.train.batch_size * cfg.model.context))


@dataclasses.dataclass
class Plan:
    """The planner's findings: ranked fitting results, the rest, and what was skipped."""

    ranked: list[Result]
    not_fitting: list[Result]
    pruned: int  # never compiled: params + optimizer state alone exceed HBM
    skipped: int  # left out by --max_candidates or --budget_s
    ties: list[str]  # labels within ESTIMATE_ERROR of the winner
    headroom: float


def rank(results: list[Result], headroom: float) -> tuple[list[Result], list[Result], list[str]]:
    """(fitting results fastest first by the no-overlap step estimate, the others, the
    labels whose estimate is within ESTIMATE_ERROR of the winner's)."""
    fit = sorted((r for r in results if r.fits(headroom) and r.step_s),
                 key=lambda r: r.step_s[0])
    rest = [r for r in results if r not in fit]
    ties = [r.label for r in fit[1:] if r.step_s[0] <= fit[0].step_s[0] * (1 + ESTIMATE_ERROR)]
    return fit, rest, ties


def plan(cfg: ml_collections.ConfigDict, topo: Topology, *, budget_s: float = 3600,
         max_candidates: int = 24, workers: int = 2, headroom: float = 0.05,
         cache_dir: str | None = None, log: Any = print, both_scans: bool = False) -> Plan:
    """Enumerates, prunes, compiles (in `workers` processes, cached) and ranks."""
    if topo.chip is None:
        raise config_lib.ConfigError(f"--topology={topo.name}: the plan ranks by a TPU chip's "
                                     "roofline; name a TPU slice (e.g. v5e-8)")
    cfg = config_lib.validate(cfg)
    hbm = topo.chip.hbm_gib * GIB
    n_params = model_lib.count_params(model_lib.unbox(model_lib.abstract_params(cfg.model)))
    all_cands = candidates(cfg, topo, both_scans)
    kept = sorted((c for c in all_cands
                   if state_bytes(cfg, topo, c, n_params) <= (1 - headroom) * hbm),
                  key=lambda c: order_key(cfg, topo, c, n_params))
    pruned = len(all_cands) - len(kept)
    todo, skipped = kept[:max_candidates], max(0, len(kept) - max_candidates)
    results: list[Result] = []
    jobs = []
    for cand in todo:
        full = compile_lib.apply_overrides(cfg, cand.settings)
        path = cache_dir and os.path.join(cache_dir, cache_key(full, topo.name) + ".json")
        if path and os.path.exists(path):
            with open(path) as f:
                results.append(Result(**{**json.load(f), "cached": True}))
        else:
            jobs.append((cand, path))
    log(f"{len(all_cands)} layouts; {pruned} pruned (params + Adam state over HBM); "
        f"compiling {len(jobs)} ({len(todo) - len(jobs)} cached, {skipped} over "
        f"--max_candidates) in {workers} worker(s), budget {budget_s:.0f} s")
    deadline = time.monotonic() + budget_s
    if jobs:
        pool = multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=4)
        try:
            pending = [(c, p, pool.apply_async(_compile_worker, ((cfg.to_dict(), topo.name,
                                                                  c.overrides),)))
                       for c, p in jobs]
            for _, path, job in pending:
                try:
                    row = job.get(timeout=max(0.0, deadline - time.monotonic()))
                except multiprocessing.TimeoutError:
                    skipped += sum(not j.ready() for _, _, j in pending)
                    log(f"--budget_s={budget_s:.0f} reached: the remaining compiles stop")
                    pool.terminate()  # stops compiles mid-way
                    break
                result = Result(**{**row, "step_s": _pair(row["step_s"]), "mfu": _pair(
                    row["mfu"]), "tokens_per_chip": _pair(row["tokens_per_chip"])})
                results.append(result)
                log(f"  {result.label}: {_gib(result.total_bytes)} GiB, "
                    f"{'fits' if result.fits(headroom) else 'does not fit'} "
                    f"({result.compile_s:.0f} s)")
                if path and (result.error is None or result.total_bytes):  # OOMs are results
                    os.makedirs(cache_dir, exist_ok=True)
                    with open(path, "w") as f:
                        json.dump(dataclasses.asdict(result), f)
        finally:
            pool.close()  # normal exits: workers leave on their own (terminate dumps)
            pool.join()
    ranked, rest, ties = rank(results, headroom)
    return Plan(ranked, rest, pruned, skipped, ties, headroom)


def _pair(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def format_plan(p: Plan, cfg: ml_collections.ConfigDict, topo: Topology) -> str:
    """The ranked table, the rejects, the footer and (last) the winner's override line."""
    lines = [f"{cfg.name} on {topo.name} ({topo.num_chips} chips, "
             f"{topo.chip.hbm_gib:.0f} GiB HBM each, {p.headroom:.0%} headroom)", "",
             "| rank | layout | GiB per chip | bound | step estimate (s) | MFU estimate | "
             "tokens/s per chip |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(p.ranked, 1):
        lines.append(f"| {i} | {r.label} | {_gib(r.total_bytes)} | {r.bound} | "
                     f"{r.step_s[1]:.3g}-{r.step_s[0]:.3g} | {r.mfu[0]:.0%}-{r.mfu[1]:.0%} | "
                     f"{r.tokens_per_chip[0]:,.0f}-{r.tokens_per_chip[1]:,.0f} |")
    for r in p.not_fitting:
        why = r.error.splitlines()[0][:100] if r.error else (
            f"{_gib(r.total_bytes)} GiB > {1 - p.headroom:.0%} of HBM")
        lines.append(f"| - | {r.label} | {_gib(r.total_bytes)} | does not fit: {why} | | | |")
    lines += ["", f"{p.pruned} layouts pruned before compiling (params + Adam state alone "
              f"over HBM); {p.skipped} not compiled (--max_candidates / --budget_s).",
              FOOTER.format(err=ESTIMATE_ERROR)]
    if not p.ranked:
        lines.append("No compiled layout fits: try a larger slice or raise --max_candidates.")
        return "\n".join(lines)
    if p.ties:
        lines.append(f"Within the estimate's error of the winner ({ESTIMATE_ERROR:.0%}): "
                     f"{'; '.join(p.ties)}; measure them before choosing.")
    lines.append(p.ranked[0].line)
    return "\n".join(lines)


def plan_json(p: Plan, cfg: ml_collections.ConfigDict, topo: Topology) -> dict:
    return {"config": cfg.name, "topology": topo.name, "headroom": p.headroom,
            "estimate_error": ESTIMATE_ERROR, "winner": p.ranked[0].line if p.ranked else None,
            "ties": p.ties, "pruned": p.pruned, "skipped": p.skipped,
            "ranked": [dataclasses.asdict(r) for r in p.ranked],
            "not_fitting": [dataclasses.asdict(r) for r in p.not_fitting],
            "jax": jax.__version__, "libtpu": libtpu_version()}


# Today's hand-written settings that --table compares the plan's winner with:
# (config, topology, overrides); the GPT-3 rows are docs/aot_table.md's.
TABLE: tuple[tuple[str, str, dict[str, Any]], ...] = (
    *(("experiments/gpt2.py:small", t, {}) for t in ("v4-8", "v5e-8", "v5p-8", "v6e-8")),
    *((f"experiments/gpt3.py:{size}", t, o) for size, t, o in compile_lib.TABLE),
)


def before_after_row(spec: str, topo_name: str, overrides: dict[str, Any], **plan_kw: Any
                     ) -> str:
    """One markdown row: the hand-written settings compiled as they are, then the plan."""
    cfg = compile_lib.apply_overrides(compile_lib.load_config(spec), overrides)
    topo = parse_topology(topo_name)
    report = compile_lib.compile_train_step(cfg, topo)
    before = result_of(report, "", "as written", cfg.train.batch_size * cfg.model.context)
    p = plan(cfg, topo, **plan_kw)
    fmt = lambda r: ("does not fit" if not r.fits(p.headroom) else  # noqa: E731
                     f"{_gib(r.total_bytes)} GiB, {r.step_s[0]:.3g} s, {r.mfu[0]:.0%}")
    win = p.ranked[0] if p.ranked else None
    gain = (f"{before.step_s[0] / win.step_s[0]:.2f}x" if win and before.fits(p.headroom)
            and before.step_s else "-")
    settings = ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "as in the config"
    return (f"| {cfg.name} | {topo_name} | {settings} | {report.attention} | {fmt(before)} | "
            f"{win.label if win else 'none fits'} | {fmt(win) if win else '-'} | {gain} | "
            f"{len(p.ranked) + len(p.not_fitting)} ({p.pruned} pruned) |")


def write_table(path: str, cases: tuple = TABLE, **plan_kw: Any) -> None:
    """Runs `before_after_row` per case and (re)writes the markdown table after each."""
    rows = []
    for case in cases:
        rows.append(before_after_row(*case, **plan_kw))
        print(rows[-1], flush=True)
        text = compile_lib.with_notes("\n".join([
                "# Planned layouts against today's hand-written settings", "",
                "Generated by `python -m gpt_jax.plan --table=docs/plan_table.md` (jax "
                f"{jax.__version__}, libtpu {libtpu_version()}, on a machine without TPUs). "
                "Before: the settings as written (the config, or docs/aot_table.md's "
                "overrides) compiled as they are; after: the plan's winner. Each cell: XLA's "
                "GiB per chip, the no-overlap roofline step estimate and its MFU estimate "
                "(see the plan's footer for what the estimate leaves out). Speed-up: before "
                "/ after step estimate. Compiled: the layouts the budget allowed.", "",
                "| config | slice | hand-written settings | attention | before | plan's "
                "winner | after | speed-up | compiled |", "|---|---|---|---|---|---|---|---|---|",
                *rows, ""]), path)
        with open(path, "w") as f:  # rewritten after every row: slow compiles keep progress
            f.write(text)


def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("topology", None, "TPU slice (v4-8, v5p-128, v5e-16, v6e-64, ...).")
    flags.DEFINE_float("budget_s", 3600, "Stop compiling after this many seconds.")
    flags.DEFINE_integer("max_candidates", 24, "Compile at most this many layouts.")
    flags.DEFINE_integer("workers", 2, "Compile in this many worker processes.")
    flags.DEFINE_float("headroom", 0.05, "Fraction of HBM a fitting layout leaves free.")
    flags.DEFINE_enum("scan_layers", "config", ["config", "both"], "'config': keep the "
                      "config's model.scan_layers; 'both': try scanned and unrolled layers.")
    flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/gpt_jax/plan"),
                        "Compile results cached here ('' for none).")
    flags.DEFINE_string("out", None, "Also write the plan as JSON to this path.")
    flags.DEFINE_string("table", None, "Write the before/after table (markdown) to this path.")
    flags.DEFINE_list("table_cases", None, "--table: only these 'config,topology' indices "
                      "of plan.TABLE (e.g. 0,1); default all.")


def check_flags(f: Any) -> Topology | None:
    """The command line checked before anything is compiled (a bad value raises
    `cli.UsageError` naming the flag, a bad config field `ConfigError`): the slice, or
    None for --table."""
    from gpt_jax import cli
    for name, low in (("max_candidates", 1), ("workers", 1)):
        if f[name].value < low:
            raise cli.UsageError(f"--{name}={f[name].value} must be >= {low}")
    if not f.budget_s > 0:
        raise cli.UsageError(f"--budget_s={f.budget_s:g} must be > 0 (seconds)")
    if not 0 <= f.headroom < 1:
        raise cli.UsageError(f"--headroom={f.headroom:g} must be a fraction of HBM in [0, 1)")
    if f.cache_dir:
        cli.check_output_dir("--cache_dir", f.cache_dir)
    if f.out:
        cli.check_output_file("--out", f.out)
    if f.table_cases is not None:
        cases = f.table_cases
        if not cases or not all(i.isdigit() and int(i) < len(TABLE) for i in cases):
            raise cli.UsageError(f"--table_cases={','.join(cases)}: must be integers "
                                 f"0-{len(TABLE) - 1}, the rows of plan.TABLE")
    if f.table:
        cli.check_output_file("--table", f.table)
        return None
    topo = compile_lib.required_slice(f)
    if topo.chip is None:
        raise cli.UsageError(f"--topology={topo.name}: the plan ranks by a TPU chip's "
                             "roofline; name a TPU slice (e.g. v5e-8)")
    config_lib.validate(f.config)
    return topo


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    topo = check_flags(f)  # bad values fail before anything is compiled
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chips to lock
    jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices; run nothing
    kw = dict(budget_s=f.budget_s, max_candidates=f.max_candidates, workers=f.workers,
              headroom=f.headroom, cache_dir=f.cache_dir or None,
              log=lambda s: print(s, file=sys.stderr, flush=True))
    if topo is None:
        cases = TABLE if f.table_cases is None else tuple(TABLE[int(i)] for i in f.table_cases)
        write_table(f.table, cases, **kw)
        return
    p = plan(f.config, topo, **kw, both_scans=f.scan_layers == "both")
    print(format_plan(p, f.config, topo))
    if f.out:
        with open(f.out, "w") as out:
            json.dump(plan_json(p, f.config, topo), out, indent=1)
    if not p.ranked:
        sys.exit(1)  # the table above says so: "No compiled layout fits"


if __name__ == "__main__":
    from gpt_jax import cli
    define_flags()
    cli.run(main)
