"""Shared fixtures: tiny configs that run in milliseconds on one CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import ml_collections
import pytest

from gpt_jax.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**model: object) -> ml_collections.ConfigDict:
    cfg = base_config()
    m = cfg.model
    m.update(dict(vocab_size=61, context=16, n_layer=2, n_head=2, d_model=32, d_ff=64,
                  embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
    m.update(model)
    return cfg


@pytest.fixture
def cfg() -> ml_collections.ConfigDict:
    return tiny_config()


def stdlib_text_corpus(root: os.PathLike, names: tuple[str, ...]) -> os.PathLike:
    """`root` holding copies of the stdlib modules `names` as `<name>.txt` (a 'text' source
    of real text, made without a download)."""
    for name in names:
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name),
                    os.path.join(root, f"{name}.txt"))
    return root


def run_python(args: list[str], env: dict | None = None, timeout: int = 600,
               cwd: str | None = None) -> subprocess.CompletedProcess:
    """Runs `python args...` in a fresh process (so XLA flags never leak between tests)."""
    full_env = dict(os.environ)
    full_env.pop("XLA_FLAGS", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], env=full_env, cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- fault table
# Rows recorded by tests/test_faults.py (in any xdist worker), printed once at the end.

def pytest_configure(config) -> None:
    if not hasattr(config, "workerinput"):  # the controller; xdist workers inherit the env
        import tempfile
        os.environ["GPT_JAX_FAULT_DIR"] = tempfile.mkdtemp(prefix="gpt_jax_faults-")


def record_fault(fault: str, promise: str, result: str) -> None:
    """Adds a row to the fault table (called by a test once its promise held)."""
    import hashlib
    import json
    directory = os.environ.get("GPT_JAX_FAULT_DIR")
    if not directory:
        return
    name = hashlib.sha1(fault.encode()).hexdigest()[:12]
    with open(os.path.join(directory, name + ".json"), "w") as f:
        json.dump({"fault": fault, "promise": promise, "result": result}, f)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    import json
    directory = os.environ.get("GPT_JAX_FAULT_DIR")
    if hasattr(config, "workerinput") or not directory or not os.path.isdir(directory):
        return
    rows = sorted((json.load(open(os.path.join(directory, n))) for n in os.listdir(directory)),
                  key=lambda r: r["fault"])
    if not rows:
        return
    terminalreporter.section("fault injection: fault | promise | result")
    terminalreporter.write_line("| fault | promise | result |")
    terminalreporter.write_line("|---|---|---|")
    for r in rows:
        terminalreporter.write_line(f"| {r['fault']} | {r['promise']} | {r['result']} |")
