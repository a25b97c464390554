"""gpt_jax.plot, its CLI and both notebooks, over real tiny training runs of two widths."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys

import nbclient
import nbformat
import numpy as np
import pytest
from conftest import REPO, run_python
from test_train import train_args

from gpt_jax import goodput, metrics, plot

WIDTHS = (16, 32)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> list[str]:
    """Two 10-step runs (d_model 16 and 32, evals at steps 5 and 10), trained concurrently,
    once per session: under pytest-xdist the workers share them through a lock."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by all workers
    root = base / "plot_runs"
    dirs = [str(root / f"d{d}") for d in WIDTHS]
    with open(base / "plot_runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            train(root, dirs)
            (root / "done").touch()
    return dirs


def train(root, dirs: list[str]) -> None:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    procs = []
    for d, workdir in zip(WIDTHS, dirs):
        args = train_args(workdir, root / f"data{d}", steps=10, **{
            "model.d_model": d, "model.n_layer": 1, "train.eval_every": 5,
            "train.ckpt_every": 1000, "train.sample_tokens": 0})
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]


def test_fit_power_law_recovers_known_exponent():
    compute = np.geomspace(1e15, 1e21, 7)
    fit = plot.fit_power_law(compute, 11.5 * compute ** -0.048)
    np.testing.assert_allclose([fit.a, fit.b], [11.5, 0.048], rtol=1e-9)
    np.testing.assert_allclose(fit(compute), 11.5 * compute ** -0.048, rtol=1e-9)
    with pytest.raises(ValueError, match="distinct compute"):
        plot.fit_power_law([1e18, 1e18], [3.0, 3.1])


def test_read_metrics_for_plots(tmp_path):
    (tmp_path / metrics.METRICS_FILE).write_text(
        '{"step": 1, "loss": 5.0, "tokens": 8, "mfu": null}\n'
        '{"step": 2, "loss": "nan", "tokens": 16}\n'
        '{"step": 2, "loss": 4.0, "tokens": 16}\n'  # a resumed run repeats step 2: last wins
        '{"step": 2, "eval_loss": 4.5, "tokens": 16}\n'
        '{"step": 3, "lo')  # still being written
    rows = metrics.read_metrics(str(tmp_path))
    assert [r.get("loss", r.get("eval_loss")) for r in rows] == [5.0, 4.0, 4.5]
    cols = plot.columns([r for r in rows if "loss" in r], plot.TRAIN_KEYS)
    np.testing.assert_array_equal(cols["tokens"], [8, 16])
    assert np.isnan(cols["mfu"]).all() and np.isnan(cols["lr"]).all()


def test_workdirs_from_env(monkeypatch):
    monkeypatch.delenv(plot.WORKDIRS_ENV, raising=False)
    assert plot.workdirs_from_env(["runs/tiny"]) == ["runs/tiny"]
    monkeypatch.setenv(plot.WORKDIRS_ENV, "runs/a, gs://b/runs/b,")
    assert plot.workdirs_from_env(["runs/tiny"]) == ["runs/a", "gs://b/runs/b"]


def check_curves(curves: plot.Curves, runs: list[plot.Run]) -> None:
    """Every plotted line is its run's metrics.jsonl column against tokens seen."""
    for run in runs:
        rows = metrics.read_metrics(run.workdir)
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        for panel, (key, _, _) in plot.PANELS.items():
            if key == "mfu":  # null on CPU: nothing drawn
                assert all(r["mfu"] is None for r in train)
                continue
            line = curves.get(panel, run.label).line
            assert line in curves.axes[panel].lines
            np.testing.assert_array_equal(line.get_xdata(), [r["tokens"] for r in train])
            np.testing.assert_array_equal(line.get_ydata(), [r[key] for r in train])
        for panel in ("loss", "loss_log"):
            line = curves.get(panel, run.label, "val").line
            np.testing.assert_array_equal(line.get_xdata(), [r["tokens"] for r in evals])
            np.testing.assert_array_equal(line.get_ydata(), [r["eval_loss"] for r in evals])
        ledger = [r for r in rows if "goodput" in r]  # at the eval at step 5 and the end
        assert [r["step"] for r in ledger] == [5, 10]
        line = curves.get("goodput", run.label, "goodput").line
        assert line in curves.axes["goodput"].lines
        np.testing.assert_array_equal(line.get_xdata(), [r["tokens"] for r in ledger])
        np.testing.assert_array_equal(line.get_ydata(), [r["goodput"] for r in ledger])
        assert curves.breakdown[run.label] == {k: ledger[-1][f"goodput/{k}_s"]
                                               for k in goodput.CATEGORIES}
        assert 0 < ledger[-1]["goodput"] <= 1
        bars = curves.axes["badput"].patches  # a stacked bar per run, a segment per category
        assert len(bars) == len(runs) * len(goodput.CATEGORIES)
        mine = bars[runs.index(run)::len(runs)]  # drawn category by category
        np.testing.assert_allclose([b.get_width() for b in mine],
                                   [ledger[-1][f"goodput/{k}_s"] for k in goodput.CATEGORIES])
        np.testing.assert_allclose(mine[-1].get_x() + mine[-1].get_width(),
                                   ledger[-1]["goodput/wall_s"])


def test_curves_and_scaling_match_metrics(workdirs):
    runs = plot.load_runs(workdirs)
    assert [r.label for r in runs] == [f"tiny-char (d{d})" for d in WIDTHS]
    curves = plot.plot_curves(runs)
    check_curves(curves, runs)
    assert len(curves.axes["loss"].lines) == 2 * len(runs)  # train + val per run

    scaling = plot.plot_scaling(runs)
    assert [p.run for p in scaling.points] == [r.label for r in runs]  # compute grows with width
    for run, point in zip(runs, scaling.points):
        last_eval = [r for r in metrics.read_metrics(run.workdir) if "eval_loss" in r][-1]
        d = run.config.model.d_model
        # non-embedding: one block (2 LNs, qkv, proj, fc, proj) + final LN, by hand
        n = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 64 + 64) + (64 * d + d) + 2 * d
        assert point.n_params == n
        vocab = run.config.model.vocab_size
        assert plot.count_params(run.config.model, "total") == n + (vocab + 32) * d
        assert (point.tokens, point.loss) == (last_eval["tokens"], last_eval["eval_loss"])
        assert point.compute == 6 * n * last_eval["tokens"]
    fit = plot.fit_power_law([p.compute for p in scaling.points], [p.loss for p in scaling.points])
    assert scaling.fit == fit
    np.testing.assert_array_equal(scaling.ax.lines[0].get_ydata(), [p.loss for p in scaling.points])


# Appended to each notebook (in memory only) and run in its kernel after the notebook's cells.
NOTEBOOK_CHECKS = {
    "loss_curves": """
import test_plot
test_plot.check_curves(curves, runs)
""",
    "scaling": """
import numpy as np
assert len(scaling.points) == 2
np.testing.assert_array_equal(scaling.ax.lines[0].get_xdata(), [p.compute for p in scaling.points])
""",
}


@pytest.mark.parametrize("name", sorted(NOTEBOOK_CHECKS))
def test_notebook_runs_top_to_bottom(workdirs, tmp_path, monkeypatch, name):
    path = os.path.join(REPO, "notebooks", f"{name}.ipynb")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells
               if c.cell_type == "code"), f"{path} is saved with outputs"
    nb.cells.append(nbformat.v4.new_code_cell(NOTEBOOK_CHECKS[name]))
    monkeypatch.setenv(plot.WORKDIRS_ENV, ",".join(workdirs))
    monkeypatch.setenv("GPT_JAX_FIGDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1


def test_cli_writes_figures(workdirs, tmp_path):
    out = run_python(["-m", "gpt_jax.plot", f"--workdirs={','.join(workdirs)}",
                      f"--out={tmp_path / 'curves.png'}",
                      f"--scaling_out={tmp_path / 'sub' / 'scaling.png'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)
    assert (tmp_path / "sub" / "scaling.png").read_bytes().startswith(PNG)
    fit = plot.plot_scaling(plot.load_runs(workdirs)).fit
    printed = re.search(r"L\(C\) = (\S+) \* C\^\(-(\S+)\)", out.stdout)
    assert printed, out.stdout
    np.testing.assert_allclose(float(printed[1]), fit.a, rtol=1e-3)
    np.testing.assert_allclose(float(printed[2]), fit.b, atol=1e-4)


def test_published_endpoints_overlay_both_loss_panels(workdirs):
    curves = plot.plot_curves(plot.load_runs(workdirs))
    added = plot.plot_published(curves, "published:124m_owt")
    for panel in ("loss", "loss_log"):
        lines = [a for a in added if a in curves.axes[panel].lines]
        levels = sorted(float(a.get_ydata()[0]) for a in lines
                        if a.get_linestyle() == "-.")
        assert levels == [2.85, 3.12]  # nanoGPT's 124M, OpenAI's 124M on OpenWebText
        stars = [a for a in lines if a.get_marker() == "*"]
        assert [(float(a.get_xdata()[0]), float(a.get_ydata()[0])) for a in stars] == [
            (600_000 * 491_520, 2.85)]  # nanoGPT's 600k iterations of 491,520 tokens
    texts = [t.get_text() for t in curves.axes["loss"].get_legend().get_texts()]
    assert any(t.endswith(": 2.85 (karpathy/nanoGPT README)") for t in texts), texts
    with pytest.raises(ValueError, match="published:124m_fineweb, published:124m_owt"):
        plot.plot_published(curves, "published:nope")
