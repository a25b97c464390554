"""`python -m gpt_jax.compile`: slice names, AOT compilation for host CPUs and TPU slices."""

from __future__ import annotations

import importlib.util
import json
import re

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
    assert "FLOPs per step: XLA matmuls" in out.stdout and "model 6N+attention" in out.stdout
    assert "ICI sent" in out.stdout and "step time estimate" not in out.stdout  # no chip


# A TPU-style loop: no known_trip_count, a `counter < 5` condition, the counter starting
# at a copied constant 0; the body runs a dot and an all-reduce over groups of 2 of 4.
LOOP_HLO = """HloModule m, num_partitions=4

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p.1), index=1
  %w = f32[16,16]{1,0} constant({...})
  %y = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %s = f32[8,16]{1,0} all-reduce(%y), replica_groups=[2,2]<=[4], to_apply=%add
  %one = s32[] constant(1)
  %i.2 = s32[] add(%i.1, %one)
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i.2, %s)
}

ENTRY %main (a: f32[8,16], q: bf16[16,128,2,64], k: bf16[16,128,2,64]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %q = bf16[16,128,2,64]{3,2,1,0} parameter(1)
  %k = bf16[16,128,2,64]{3,2,1,0} parameter(2)
  %scores = f32[16,2,128,128]{3,2,1,0} ATTENTION
  %zero = s32[] constant(0)
  %z = s32[] copy(%zero)
  %t0 = (s32[], f32[8,16]{1,0}) tuple(%z, %a)
  %loop = (s32[], f32[8,16]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
""".replace("ATTENTION", "convolution(%q, %k), window={size=16x2 stride=15x1 lhs_dilate=16x2}, "
                         "dim_labels=0b1f_0o1i->01bf")


def test_hlo_cost_counts_loops_and_batched_convolutions():
    cost = compile_lib.hlo_cost(LOOP_HLO, uncounted_trip_count=3)
    # XLA:TPU's form of einsum('bthd,bshd->bhts') for b=16, h=2, t=s=128, d=64: its
    # windows are mostly dilation holes, so only the taps on real elements count.
    attention = 2 * 16 * 2 * 128 * 128 * 64
    assert cost.matmul_flops == attention + 5 * 2 * 8 * 16 * 16
    assert cost.collective_bytes == {"all-reduce": 5 * 2 * (8 * 16 * 4) / 2}
    assert cost.uncounted_loops == 0
    unbounded = LOOP_HLO.replace("%n = s32[] constant(5)", "%n = s32[] parameter(1)")
    cost = compile_lib.hlo_cost(unbounded, uncounted_trip_count=3)
    assert cost.uncounted_loops == 1 and cost.matmul_flops == attention + 3 * 2 * 8 * 16 * 16


# Three compilations of one model on 4 host devices: the walk of the unrolled step must
# agree with XLA's own count (which adds the elementwise work), and the microbatched and
# scanned steps, whose loop bodies XLA's count takes once, must add up to the same total.
COUNT_STEPS = """
import json, jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")
from gpt_jax import compile as c
cfg = c.apply_overrides(c.load_config("experiments/tiny.py:char"), {
    "model.context": 32, "model.n_layer": 2, "model.n_head": 4, "model.d_model": 128,
    "model.d_ff": 512, "train.batch_size": 16, "mesh.model": 2, "mesh.fsdp": True})
variants = {"unrolled": {}, "microbatched": {"train.microbatches": 2},
            "scanned": {"model.scan_layers": True, "train.microbatches": 2}}
out = {}
for name, overrides in variants.items():
    r = c.compile_train_step(c.apply_overrides(cfg, overrides), c.parse_topology("cpu:4"))
    out[name] = [r.cost_analysis_flops, r.hlo.matmul_flops, r.hlo.ici_bytes,
                 r.hlo.uncounted_loops]
print(json.dumps(out))
"""


def test_loops_are_counted_per_step():
    out = run_python(["-c", COUNT_STEPS])
    assert out.returncode == 0, out.stderr[-3000:]
    steps = json.loads(out.stdout.splitlines()[-1])
    xla, flops, ici, uncounted = steps["unrolled"]
    assert 0.9 * xla < flops <= xla and uncounted == 0
    # XLA's count takes the microbatch body once: half the step.
    assert steps["microbatched"][0] < 0.6 * xla
    assert steps["microbatched"][1] == pytest.approx(flops, rel=0.01)
    # Scanning changes the program a little (XLA:CPU shards scanned attention differently).
    assert steps["scanned"][1] == pytest.approx(flops, rel=0.1)
    # Gradients are reduced (reduce-scattered under FSDP) once per microbatch, the
    # weights gathered once per pass: with 2 microbatches, between 1x and 2x the bytes.
    for name in ("microbatched", "scanned"):
        assert ici < steps[name][2] <= 2 * ici and steps[name][3] == 1, steps


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
    assert "MFU ceiling" in out.stdout and "-bound; MFU estimate" in out.stdout


@needs_libtpu
def test_tpu_loops_add_up_to_the_unrolled_step():
    flops = []
    for loops in ([], ["--config.model.scan_layers=True", "--config.train.microbatches=2"]):
        out = run_python(["-m", "gpt_jax.compile", "--topology=v5p-8", *TINY,
                          "--config.mesh.model=2", *loops])
        assert out.returncode == 0, out.stderr[-3000:]
        flops.append(float(re.search(r"XLA matmuls ([\d.e+]+)", out.stdout).group(1)))
    assert flops[1] == pytest.approx(flops[0], rel=0.01)


@needs_libtpu
def test_overflow_says_what_to_try():
    out = run_python(["-m", "gpt_jax.compile", "--topology=v5e-1", *TINY,
                      "--config.model.d_model=8192", "--config.model.d_ff=32768"])
    assert out.returncode == 1, out.stderr[-3000:]
    assert "does not fit: needs more than" in out.stdout and "of 16.00 GiB" in out.stdout
    assert "--config.model.remat=full" in out.stdout


# FSDP shards the weights' embed dimension over `data`, where the batch also lives.
# Without the residual stream pinned (sharding.ACTIVATION_RULES) XLA resharded the
# activations instead of gathering weights: 28% more matmul FLOPs here, 1.8x at 13B.
FSDP_WORK = """
import json, jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
from gpt_jax import compile as c
cfg = c.apply_overrides(c.load_config("experiments/gpt3.py:small"), {
    "model.context": 128, "model.n_layer": 2, "model.n_head": 4, "model.d_model": 256,
    "model.d_ff": 1024, "model.vocab_size": 512, "model.scan_layers": False,
    "train.batch_size": 16, "train.microbatches": 1, "mesh.model": 2})
out = {}
for fsdp in (False, True):
    r = c.compile_train_step(c.apply_overrides(cfg, {"mesh.fsdp": fsdp}), c.parse_topology("cpu:8"))
    out[str(fsdp)] = [r.hlo.matmul_flops, r.hlo.ici_bytes]
print(json.dumps(out))
"""


def test_fsdp_adds_no_matmul_work():
    out = run_python(["-c", FSDP_WORK])
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["True"][0] == pytest.approx(r["False"][0], rel=0.02), r
    assert r["True"][1] < 2 * r["False"][1], r  # weight gathers, not activation reshards
