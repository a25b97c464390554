"""Loss curves and compute scaling from training workdirs; `python -m gpt_jax.plot`.

    python -m gpt_jax.plot --workdirs=runs/a,runs/b --out=curves.png \
        [--scaling_out=scaling.png]

Reads only what `gpt_jax.train` writes: `metrics.jsonl` and `config.json`, from
local paths or `gs://` (through `etils.epath`). Figures are built with
matplotlib's object-oriented API (no pyplot, rendered by Agg), so this works
headless and the notebooks in `notebooks/` display the same Figures. Every
plotting function returns what it drew (the per-run series, each with its
matplotlib line, and the Figure) so callers and tests can check it.

Goodput: the run's goodput fraction (`gpt_jax.goodput`: productive step time over all
paid wall time, across restarts) against tokens seen, and its ledger's last breakdown
(seconds by category) as one stacked bar per run.

Scaling: the final validation loss of each run against its training compute
C = 6 N D FLOPs, D = tokens seen at that eval and N = non-embedding parameters
by default (Kaplan et al. 2020, whose convention the GPT-3 compute figure
follows; token and position embeddings excluded) or all parameters, with a
log-log least-squares fit of L(C) = a * C^(-b).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter

from gpt_jax import cli, goodput, metrics, model, published, reference
from gpt_jax.workdir import Workdir

WORKDIRS_ENV = "GPT_JAX_WORKDIRS"
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu")
EVAL_KEYS = ("eval_loss", "eval_ppl", "eval_bpb")
# panel name -> (metric plotted against tokens seen, y label, log-log axes)
PANELS = {
    "loss": ("loss", "loss (nats/token)", False),
    "loss_log": ("loss", "loss (nats/token), log-log", True),
    "lr": ("lr", "learning rate", False),
    "grad_norm": ("grad_norm", "gradient norm (before clipping)", False),
    "tokens_per_s": ("tokens_per_s", "throughput (tokens/s)", False),
    "mfu": ("mfu", "MFU", False),
}
GOODPUT_KEYS = ("goodput", *(f"goodput/{k}_s" for k in goodput.CATEGORIES))
PARAM_COUNTS = ("non_embedding", "total")


@dataclass(frozen=True)
class Run:
    """One workdir's metrics as columns (numpy float arrays, NaN where absent)."""

    workdir: str
    label: str
    config: ml_collections.ConfigDict
    train: dict[str, np.ndarray]  # "step", "tokens" and TRAIN_KEYS, one entry per training row
    eval: dict[str, np.ndarray]  # "step", "tokens" and EVAL_KEYS, one entry per eval row
    # "step", "tokens" and GOODPUT_KEYS, one entry per goodput row (none in older runs)
    goodput: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Series:
    """One plotted line: `panel` of PANELS (or "goodput"), `kind` "train", "val" or
    "goodput"."""

    panel: str
    run: str
    kind: str
    x: np.ndarray
    y: np.ndarray
    line: Line2D


@dataclass(frozen=True)
class Curves:
    """What `plot_curves` drew: the Figure, its axes by panel name, every line, and the
    seconds by goodput category of each run's stacked bar (panel "badput")."""

    figure: Figure
    axes: dict[str, Axes]
    series: list[Series]
    breakdown: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def get(self, panel: str, run: str, kind: str = "train") -> Series:
        """The line of `run` (its label) in `panel`; StopIteration if none was drawn."""
        return next(s for s in self.series if (s.panel, s.run, s.kind) == (panel, run, kind))


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = a * C^(-b)."""

    a: float
    b: float

    def __call__(self, c: Any) -> Any:
        return self.a * np.asarray(c, dtype=np.float64) ** -self.b


@dataclass(frozen=True)
class ScalingPoint:
    """One run's final validation loss at its training compute C = 6 * n_params * tokens."""

    run: str
    n_params: int
    tokens: float
    compute: float
    loss: float


@dataclass(frozen=True)
class Scaling:
    """What `plot_scaling` drew: the points (by compute), the fit, and where."""

    figure: Figure
    ax: Axes
    points: list[ScalingPoint]
    fit: PowerLaw
    params: str  # "non_embedding" or "total": N in C = 6ND


# ---------------------------------------------------------------- loading


def _float(value: Any) -> float:
    """JSON value -> float: None -> NaN; "nan"/"inf" (how MetricsWriter writes them) parse."""
    return math.nan if value is None else float(value)


def columns(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Rows -> {"step", "tokens", *keys: float array}."""
    return {k: np.array([_float(r.get(k)) for r in rows], dtype=np.float64)
            for k in ("step", "tokens", *keys)}


def load_run(workdir: str, label: str | None = None) -> Run:
    """A workdir's config and metrics; labelled by its config name unless `label` is given."""
    cfg = Workdir(workdir).read_config()
    rows = metrics.read_metrics(workdir)
    return Run(workdir=str(workdir), label=label or cfg.get("name", os.path.basename(workdir)),
               config=cfg,
               train=columns([r for r in rows if "loss" in r], TRAIN_KEYS),
               eval=columns([r for r in rows if "eval_loss" in r], EVAL_KEYS),
               goodput=columns([r for r in rows if "goodput" in r], GOODPUT_KEYS))


def load_runs(workdirs: Sequence[str]) -> list[Run]:
    """Runs labelled by config name; names shared by several runs get the workdir's basename."""
    runs = [load_run(w) for w in workdirs]
    names = [r.label for r in runs]
    return [dataclasses.replace(r, label=f"{r.label} ({epath.Path(r.workdir).name})")
            if names.count(r.label) > 1 else r for r in runs]


def workdirs_from_env(default: Sequence[str], var: str = WORKDIRS_ENV) -> list[str]:
    """Comma-separated workdirs from the environment variable `var`, else `default`."""
    value = os.environ.get(var, "").strip()
    return [w.strip() for w in value.split(",") if w.strip()] if value else list(default)


# ---------------------------------------------------------------- loss curves


def plot_curves(runs: Sequence[Run]) -> Curves:
    """Training (solid) and validation (dashed, dots) loss against tokens seen, linear and
    log-log; learning rate, gradient norm, throughput and MFU; goodput and its breakdown;
    one colour per run."""
    fig = Figure(figsize=(21, 9), layout="constrained")
    grid = fig.subplots(2, 4)
    axes = dict(zip((*PANELS, "goodput", "badput"), grid.flat))
    series: list[Series] = []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for panel, (key, _, _) in PANELS.items():
            ax = axes[panel]
            x, y = run.train["tokens"], run.train[key]
            if np.isfinite(y).any():
                (line,) = ax.plot(x, y, color=color, label=f"{run.label} train")
                series.append(Series(panel, run.label, "train", x, y, line))
            if key == "loss" and len(run.eval["step"]):
                x, y = run.eval["tokens"], run.eval["eval_loss"]
                (line,) = ax.plot(x, y, "o--", color=color, label=f"{run.label} val")
                series.append(Series(panel, run.label, "val", x, y, line))
    for panel, (_, ylabel, loglog) in PANELS.items():
        ax = axes[panel]
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, which="both" if loglog else "major")
        if loglog:
            _loglog(ax)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {PANELS[panel][0]} recorded\n(MFU needs a known peak FLOP/s)"
                    if panel == "mfu" else f"no {PANELS[panel][0]} recorded",
                    ha="center", va="center", transform=ax.transAxes)
    if axes["loss"].lines:
        axes["loss"].legend(fontsize="small")
    breakdown = _plot_goodput(axes["goodput"], axes["badput"], runs, series)
    fig.suptitle("training runs: " + ", ".join(r.label for r in runs))
    return Curves(fig, axes, series, breakdown)


def _plot_goodput(line_ax: Axes, bar_ax: Axes, runs: Sequence[Run],
                  series: list[Series]) -> dict[str, dict[str, float]]:
    """Goodput against tokens seen (one line per run, added to `series`), and each run's
    last ledger as a stacked bar of seconds by category; returns those seconds."""
    breakdown: dict[str, dict[str, float]] = {}
    for i, run in enumerate(runs):
        if not len(run.goodput.get("step", ())):
            continue
        x, y = run.goodput["tokens"], run.goodput["goodput"]
        (line,) = line_ax.plot(x, y, "o-", color=f"C{i % 10}", label=run.label)
        series.append(Series("goodput", run.label, "goodput", x, y, line))
        breakdown[run.label] = {k: float(run.goodput[f"goodput/{k}_s"][-1])
                                for k in goodput.CATEGORIES}
    line_ax.set_xlabel("tokens seen")
    line_ax.set_ylabel("goodput (productive step s / wall s)")
    line_ax.set_ylim(0.0, 1.05)
    line_ax.grid(True, alpha=0.3)
    labels = list(breakdown)
    for j, category in enumerate(goodput.CATEGORIES):
        widths = [np.nan_to_num(breakdown[r][category]) for r in labels]
        left = [sum(np.nan_to_num(breakdown[r][c]) for c in goodput.CATEGORIES[:j])
                for r in labels]
        if labels:
            bar_ax.barh(labels, widths, left=left, height=0.5, color=f"C{j % 10}",
                        label=category)
    bar_ax.set_xlabel("where the wall time went: seconds, all attempts (last goodput row)")
    if labels:  # above the bars, not over them
        bar_ax.legend(fontsize="small", ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    else:
        for ax in (line_ax, bar_ax):
            ax.text(0.5, 0.5, "no goodput recorded", ha="center", va="center",
                    transform=ax.transAxes)
    return breakdown


def _loglog(ax: Axes) -> None:
    """Log-log axes; losses span less than a decade, so y ticks read as plain numbers."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))


def plot_reference(curves: Curves, curve: dict[str, Any]) -> list[Series]:
    """Overlays a pinned reference curve (`gpt_jax.reference.read`) on both loss panels,
    training dashed and validation dotted, in black; returns (and adds) its lines."""
    label = f"{curve['name']} reference"
    added = []
    for panel in ("loss", "loss_log"):
        ax = curves.axes[panel]
        for kind, x, y, style in (("train", curve["tokens"], curve["loss"], "--"),
                                  ("val", curve["eval_tokens"], curve["eval_loss"], "x:")):
            if len(y):
                x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
                (line,) = ax.plot(x, y, style, color="black", alpha=0.7,
                                  label=f"{label}{' val' if kind == 'val' else ''}")
                added.append(Series(panel, label, kind, x, y, line))
    curves.axes["loss"].legend(fontsize="small")
    curves.series.extend(added)
    return added


def plot_published(curves: Curves, name: str) -> list[Any]:
    """Overlays recipe `name`'s published validation losses (`gpt_jax.published`) on both
    loss panels: a grey horizontal line at each, with a star at the tokens where the peer
    reached it; returns (and adds) the artists."""
    added: list[Any] = []
    for end in published.endpoints(name):
        if end.metric != "eval_loss":
            continue  # no panel for task accuracies yet (published.py)
        for panel in ("loss", "loss_log"):
            ax = curves.axes[panel]
            added.append(ax.axhline(end.value, color="grey", linestyle="-.", linewidth=1,
                                    label=f"{end.label}: {end.value:g} ({end.source})"))
            if end.tokens is not None:
                added.append(ax.plot([end.tokens], [end.value], "*", color="grey",
                                     markersize=10)[0])
    curves.axes["loss"].legend(fontsize="x-small")
    return added


# ---------------------------------------------------------------- scaling


def count_params(model_cfg: ml_collections.ConfigDict, params: str = "non_embedding") -> int:
    """Parameters of a model config (shapes only): all, or without the wte/wpe tables."""
    if params not in PARAM_COUNTS:
        raise ValueError(f"params={params!r} is not one of {list(PARAM_COUNTS)}")
    shapes = model.unbox(model.abstract_params(model_cfg))
    total = model.count_params(shapes)
    if params == "total":
        return total
    return total - sum(model.count_params(shapes[k]) for k in ("wte", "wpe") if k in shapes)


def scaling_points(runs: Sequence[Run], params: str = "non_embedding") -> list[ScalingPoint]:
    """(N, D, C = 6ND, final validation loss) of every run with an eval row, by compute."""
    points = []
    for run in runs:
        if not len(run.eval["step"]):
            continue
        n = count_params(run.config.model, params)
        tokens, loss = float(run.eval["tokens"][-1]), float(run.eval["eval_loss"][-1])
        points.append(ScalingPoint(run.label, n, tokens, 6.0 * n * tokens, loss))
    return sorted(points, key=lambda p: p.compute)


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Least squares of log L = log a - b log C: L(C) = a * C^(-b)."""
    c, loss_ = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
    if len(np.unique(c)) < 2:
        raise ValueError(f"a power-law fit needs runs at >= 2 distinct compute values, got {c}")
    slope, intercept = np.polyfit(np.log(c), np.log(loss_), 1)
    return PowerLaw(a=float(np.exp(intercept)), b=float(-slope))


def plot_scaling(runs: Sequence[Run], params: str = "non_embedding") -> Scaling:
    """Final validation loss against C = 6ND on log-log axes, with the fitted power law."""
    points = scaling_points(runs, params)
    fit = fit_power_law([p.compute for p in points], [p.loss for p in points])
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    c = np.array([p.compute for p in points])
    ax.plot(c, [p.loss for p in points], "o", label="final validation loss")
    for p in points:
        ax.annotate(f"{p.run}\nN={p.n_params:,}", (p.compute, p.loss), fontsize="x-small",
                    textcoords="offset points", xytext=(4, 4))
    grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 100)
    ax.plot(grid, fit(grid), "--", label=f"L = {fit.a:.3g} · C^(-{fit.b:.4f})")
    _loglog(ax)
    ax.set_xlabel(f"training compute C = 6ND (FLOPs), N = {params.replace('_', '-')} params")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    return Scaling(fig, ax, points, fit, params)


# ---------------------------------------------------------------- output


def save_figure(fig: Figure, path: str, dpi: int = 120) -> None:
    """Writes a Figure (format from the suffix) to a local or gs:// path."""
    path = epath.Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def define_flags() -> None:
    """CLI flags, defined only when run as a program so importing this module is free."""
    flags.DEFINE_list("workdirs", None, "Comma-separated workdirs (local or gs://).")
    flags.DEFINE_string("out", "curves.png", "Where to write the loss-curve figure.")
    flags.DEFINE_string("scaling_out", None, "If set, where to write the compute-scaling fit.")
    flags.DEFINE_enum("params", "non_embedding", list(PARAM_COUNTS),
                      "N in C = 6ND for the scaling fit.")
    flags.DEFINE_list("reference", [], "Pinned reference curves to overlay, dashed: names "
                      "(`python -m gpt_jax.reference`, e.g. gpt2:small), JSON paths, "
                      "'auto' (each run's own, if it has the reference's size), or a "
                      "recipe's published endpoints ('published:124m_fineweb', "
                      "'published:124m_owt').")
    flags.mark_flags_as_required(["workdirs"])
    flags.FLAGS.set_default("verbosity", logging.WARNING)


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    peers = [n for n in f.reference if n.startswith("published:")]
    for name in peers:  # before any run is read
        try:
            published.endpoints(name)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
    runs = load_runs(f.workdirs)
    curves = plot_curves(runs)
    for name in peers:
        plot_published(curves, name)
    names = [n for n in f.reference if n != "auto" and n not in peers]
    if "auto" in f.reference:
        names += [n for n in map(reference.for_run, (r.config for r in runs))
                  if n and n not in names]
    for name in names:
        plot_reference(curves, reference.read(name))
    save_figure(curves.figure, f.out)
    print(f"wrote {f.out}: {', '.join(r.label for r in runs)}"
          + (f"; reference curves {', '.join(names)}" if names else "")
          + (f"; published endpoints {', '.join(peers)}" if peers else ""))
    if f.scaling_out:
        scaling = plot_scaling(runs, f.params)
        save_figure(scaling.figure, f.scaling_out)
        for p in scaling.points:
            print(f"{p.run}: N={p.n_params:,} D={p.tokens:,.0f} C={p.compute:.3e} "
                  f"loss={p.loss:.4f}")
        print(f"L(C) = {scaling.fit.a:.4g} * C^(-{scaling.fit.b:.4f})  "
              f"(N = {f.params} params); wrote {f.scaling_out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main, errors=(reference.ReferenceError,))
