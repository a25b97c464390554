"""`python -m gpt_jax.compile`: slice names, AOT compilation for host CPUs and TPU slices."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import run_python

from gpt_jax import compile as compile_lib

TINY = ["--config=experiments/tiny.py:char", "--config.model.context=32",
        "--config.model.n_layer=2", "--config.model.n_head=4", "--config.model.d_model=64",
        "--config.model.d_ff=128", "--config.train.batch_size=8"]
NO_LIBTPU = importlib.util.find_spec("libtpu") is None
needs_libtpu = pytest.mark.skipif(
    NO_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): TPU topologies "
                      "cannot be described, so the TPU AOT path is not exercised here")


@pytest.mark.parametrize("name,chips,shape", [
    ("v4-8", 4, (2, 2, 1)), ("v4-32", 16, (2, 2, 4)), ("v5p-128", 64, (4, 4, 4)),
    ("v5p-256", 128, (4, 4, 8)), ("v5e-16", 16, (4, 4)), ("v5litepod-16", 16, (4, 4)),
    ("v5e-8", 8, (2, 4)), ("v6e-64", 64, (8, 8)), ("v5p:2x4x4", 32, (2, 4, 4)),
    ("cpu:8", 8, (8,))])
def test_topology_names(name, chips, shape):
    topo = compile_lib.parse_topology(name)
    assert topo.num_chips == chips and topo.shape == shape


@pytest.mark.parametrize("bad", ["v9-8", "v5p-7", "v5e-12", "v5p:4x4", "tpu"])
def test_bad_topology_names(bad):
    with pytest.raises(ValueError, match="topology"):
        compile_lib.parse_topology(bad)


def test_compiles_for_host_cpus():
    out = run_python(["-m", "gpt_jax.compile", "--topology=cpu:8", *TINY,
                      "--config.mesh.model=2", "--config.mesh.fsdp=True"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on cpu:8: 8 chips, mesh data=4 x model=2, fsdp=True" in out.stdout
    assert "memory per chip: arguments" in out.stdout and "fits: n/a" in out.stdout
    assert "FLOPs per step: XLA" in out.stdout and "model 6N+attention" in out.stdout


def test_bad_mesh_is_a_config_error():
    out = run_python(["-m", "gpt_jax.compile", "--topology=cpu:8", *TINY,
                      "--config.mesh.data=3"])
    assert out.returncode != 0 and "mesh.data=3" in out.stderr


@needs_libtpu
def test_compiles_for_a_tpu_slice():
    out = run_python(["-m", "gpt_jax.compile", "--topology=v5p-8", *TINY,
                      "--config.mesh.model=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on v5p-8: 4 chips, mesh data=2 x model=2" in out.stdout
    assert "of 95.00 GiB HBM per chip" in out.stdout
    assert "MFU ceiling" in out.stdout


@needs_libtpu
def test_overflow_says_what_to_try():
    out = run_python(["-m", "gpt_jax.compile", "--topology=v5e-1", *TINY,
                      "--config.model.d_model=8192", "--config.model.d_ff=32768"])
    assert out.returncode == 1, out.stderr[-3000:]
    assert "does not fit: needs more than" in out.stdout and "of 16.00 GiB" in out.stdout
    assert "--config.model.remat=full" in out.stdout
