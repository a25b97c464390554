"""`python -m gpt_jax.compile`: slice names, AOT compilation for host CPUs and TPU slices."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import run_python

from gpt_jax import chips, flops, hlo_cost

TINY = ["--config=experiments/tiny.py:char", "--config.model.context=32",
        "--config.model.n_layer=2", "--config.model.n_head=4", "--config.model.d_model=64",
        "--config.model.d_ff=128", "--config.train.batch_size=8"]
NO_LIBTPU = importlib.util.find_spec("libtpu") is None
needs_libtpu = pytest.mark.skipif(
    NO_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): TPU topologies "
                      "cannot be described, so the TPU AOT path is not exercised here")


@pytest.mark.parametrize("name,num_chips,shape", [
    ("v4-8", 4, (2, 2, 1)), ("v4-32", 16, (2, 2, 4)), ("v5p-128", 64, (4, 4, 4)),
    ("v5p-256", 128, (4, 4, 8)), ("v5e-16", 16, (4, 4)), ("v5litepod-16", 16, (4, 4)),
    ("v5e-8", 8, (2, 4)), ("v6e-64", 64, (8, 8)), ("v5p:2x4x4", 32, (2, 4, 4)),
    ("cpu:8", 8, (8,))])
def test_topology_names(name, num_chips, shape):
    topo = chips.parse_topology(name)
    assert topo.num_chips == num_chips and topo.shape == shape


@pytest.mark.parametrize("bad", ["v9-8", "v5p-7", "v5e-12", "v5p:4x4", "tpu"])
def test_bad_topology_names(bad):
    with pytest.raises(ValueError, match="topology"):
        chips.parse_topology(bad)


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
    cost = hlo_cost.hlo_cost(LOOP_HLO, uncounted_trip_count=3)
    # XLA:TPU's form of einsum('bthd,bshd->bhts') for b=16, h=2, t=s=128, d=64: its
    # windows are mostly dilation holes, so only the taps on real elements count.
    attention = 2 * 16 * 2 * 128 * 128 * 64
    assert cost.matmul_flops == attention + 5 * 2 * 8 * 16 * 16
    assert cost.collective_bytes == {"all-reduce": 5 * 2 * (8 * 16 * 4) / 2}
    assert cost.uncounted_loops == 0
    # XLA:TPU's windowed-einsum loops are unrolled twice: the counter steps by 2
    by_two = LOOP_HLO.replace("%one = s32[] constant(1)", "%one = s32[] constant(2)")
    assert hlo_cost.hlo_cost(by_two, 3).matmul_flops == attention + 3 * 2 * 8 * 16 * 16
    unbounded = LOOP_HLO.replace("%n = s32[] constant(5)", "%n = s32[] parameter(1)")
    cost = hlo_cost.hlo_cost(unbounded, uncounted_trip_count=3)
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
    "model.d_ff": 512, "train.batch_size": 16, "mesh.model": 2, "mesh.fsdp": True,
    # AdamW: Muon's Newton-Schulz matmuls run once per step, outside the microbatch loop
    "optim.optimizer": "adamw"})
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


def test_memory_breakdown_lists_the_largest_temporaries():
    out = run_python(["-m", "gpt_jax.compile", "--topology=cpu:2", *TINY,
                      "--memory_breakdown=4"])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("largest values in the temp"))
    rows = lines[at + 1:]
    assert len(rows) == 4 and all(re.match(r" +[\d.,]+ MiB +\d+ x \w+\[", r) for r in rows), rows


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


# A Pallas kernel as XLA:TPU prints it: one instruction over several lines (its metadata
# is multi-line JSON, one line of which starts with `}`), a custom call whose matmuls the
# walk takes from the splash mask and block sizes. The dot after it must still be seen.
KERNEL = ("custom-call(%m, %q, %q, %q), custom_call_target=\"tpu_custom_call\", "
          "frontend_attributes={kernel_metadata={\n"
          '"xprof_metadata":"{\\"block_q\\": 128, \\"block_kv\\": 128, '
          '\\"block_q_dkv\\": 256, \\"block_kv_dkv\\": 256}"\n'
          '}}, metadata={op_name="jit(step)/h_1/attn/shard_map/splash_band256/vmap('
          'static_sparsity_splash)/jit(_splash_attention)/splash_mha_fwd_residuals/pallas_call"}')
SPLASH_HLO = """HloModule m, num_partitions=1

ENTRY %main (q: f32[4,2,512,64], w: f32[8,16]) -> f32[8,16] {
  %q = f32[4,2,512,64]{3,2,1,0} parameter(0)
  %w = f32[8,16]{1,0} parameter(1)
  %m = s8[1,1,1]{2,1,0} constant({...})
  %o = (f32[4,2,512,64]{3,2,1,0}, f32[4,2,512,128]{3,2,1,0}) KERNEL
  %x = f32[8,16]{1,0} constant({...})
  ROOT %y = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
""".replace("KERNEL", KERNEL)


def test_hlo_cost_reads_splash_kernels_over_several_lines():
    cost = hlo_cost.hlo_cost(SPLASH_HLO, uncounted_trip_count=1)
    # 4 query blocks of 128 see their own and the two before within the 256-token band:
    # 1 + 2 + 3 + 3 = 9 block pairs; 2 matmuls of 2 x 128 x 128 x 64 each, x 4 x 2 heads.
    splash = 9 * 2 * 2 * 128 * 128 * 64 * 4 * 2
    assert cost.matmul_flops == splash + 2 * 8 * 16 * 16
    causal = SPLASH_HLO.replace("splash_band256", "splash_causal")
    assert hlo_cost.hlo_cost(causal, 1).matmul_flops == 10 * splash / 9 + 2 * 8 * 16 * 16
    one_row = SPLASH_HLO.replace("f32[4,2,512,64]", "f32[2,512,64]")  # batch 1: 3-D
    assert hlo_cost.hlo_cost(one_row, 1).matmul_flops == splash / 4 + 2 * 8 * 16 * 16
    dkv = SPLASH_HLO.replace("splash_mha_fwd", "splash_mha_dkv")  # its own blocks: 256
    assert hlo_cost.hlo_cost(dkv, 1).matmul_flops == (
        3 * 4 * 2 * 256 * 256 * 64 * 4 * 2 + 2 * 8 * 16 * 16)


@pytest.mark.parametrize("length,window,bq,bkv,pairs", [
    (2048, None, 512, 512, 10), (2048, 256, 512, 512, 7), (2048, 256, 128, 128, 45),
    (512, 100, 128, 256, 5)])
def test_splash_block_pairs(length, window, bq, bkv, pairs):
    assert hlo_cost.splash_block_pairs(length, window, bq, bkv) == pairs


def test_one_chip_table():
    # flops (MFU), bench and compile read the same chips: every kind maps back to its chip
    for chip in chips.CHIPS.values():
        for kind in chip.device_kinds:
            device = type("Device", (), {"device_kind": kind + " (variant)"})()
            assert chips.chip_of(device) is chip
            assert flops.device_peak_flops(device) == chip.peak_flops
    assert chips.parse_topology("v6e-8").chip is chips.CHIPS["v6e"]
    with pytest.raises(ValueError, match="topology"):
        chips.parse_topology("h100-8")  # GPUs are not TPU slices


# bfloat16 end to end (the GPT-2 and GPT-3 training configs): every matmul of the train step
# takes bfloat16 operands, forward and backward (the scores' and logits' float32 cotangents
# are rounded to bfloat16 before their gradient matmuls: gpt_jax/precision.py), in the
# jaxpr and in the lowered HLO; params and Adam moments stay float32, and the softmax
# statistics (max, exp, log) and the step's metrics are float32.
DTYPES = r"""
import collections, json, re, jax
from jax.extend import core
from gpt_jax import compile as c, loop, sharding
small = {"model.context": 32, "model.n_layer": 2, "model.n_head": 2, "model.d_model": 64,
         "model.d_ff": 128, "model.vocab_size": 128, "train.batch_size": 4,
         "train.microbatches": 2}
out = {}
# the paper configs as they are: bfloat16 compute (HF imports pin float32 in convert.py)
for spec, dtype in (("experiments/gpt2.py:small", {}), ("experiments/gpt3.py:small", {})):
    cfg = c.apply_overrides(c.load_config(spec), {**small, **dtype})
    trainer = loop.build_trainer(cfg, sharding.make_mesh(cfg))
    jaxpr = jax.make_jaxpr(trainer.train_step)(*c.abstract_inputs(trainer)).jaxpr
    seen = collections.Counter()
    def walk(j):
        for e in j.eqns:
            if e.primitive.name in ("dot_general", "reduce_max", "exp", "log"):
                ins = "x".join(sorted(str(v.aval.dtype) for v in e.invars))
                seen[f"{e.primitive.name} {ins} -> {e.outvars[0].aval.dtype}"] += 1
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
                        walk(getattr(sub, "jaxpr", sub))
    walk(jaxpr)
    state, metrics = jax.eval_shape(trainer.train_step, *c.abstract_inputs(trainer))
    hlo = trainer.train_step.lower(*c.abstract_inputs(trainer)).as_text()
    hlo_dots = collections.Counter(
        " x ".join(re.findall(r"x(bf16|f32)>", m.group(1))) + " -> " + m.group(2)
        for m in re.finditer(r"stablehlo.dot_general.*: \((.*)\) -> tensor<.*x(bf16|f32)>", hlo))
    out[spec] = {"ops": seen, "hlo_dots": hlo_dots, "state": sorted({
        str(x.dtype) for x in jax.tree.leaves((state["params"], state["opt_state"])) if x.ndim}),
        "metrics": {k: str(v.dtype) for k, v in metrics.items()}}
print(json.dumps(out))
"""


def test_bfloat16_compute_float32_state_and_statistics():
    out = run_python(["-c", DTYPES])
    assert out.returncode == 0, out.stderr[-3000:]
    for spec, r in json.loads(out.stdout.splitlines()[-1]).items():
        ops = r["ops"]
        dots = {k: n for k, n in ops.items() if k.startswith("dot_general")}
        assert dots.get("dot_general bfloat16xbfloat16 -> bfloat16", 0) > 0, (spec, dots)
        assert dots.get("dot_general bfloat16xbfloat16 -> float32", 0) >= 2, (spec, dots)
        assert set(dots) == {"dot_general bfloat16xbfloat16 -> bfloat16",
                             "dot_general bfloat16xbfloat16 -> float32"}, (spec, dots)
        hlo_dots = r["hlo_dots"]  # the same in the HLO the compiler is given
        assert set(hlo_dots) == {"bf16 x bf16 -> bf16", "bf16 x bf16 -> f32"}, (spec, hlo_dots)
        assert sum(hlo_dots.values()) == sum(dots.values()), (spec, hlo_dots, dots)
        stats = [k for k in ops if not k.startswith("dot_general")]
        assert stats and all(k.endswith("float32 -> float32") and "bfloat16" not in k
                             for k in stats), (spec, stats)
        assert r["state"] == ["float32"], (spec, r["state"])
        assert r["metrics"] == {"loss": "float32", "grad_norm": "float32"}, (spec, r)


# CI's TPU compile: a 2-layer GPT-2-small-shaped model (d_model 768, 12 heads of 64; context
# and vocabulary cut so it compiles in well under a minute) on a v5e-8, with each attention
# kernel; the splash step is FSDP-sharded and its eval step compiled on the same mesh.
# About 35 s of CPU per kernel.
TPU_STEPS = """
import json, jax
jax.config.update("jax_platforms", "cpu")
from gpt_jax import chips, compile as c, hlo_cost, loop, sharding, steps
cfg = c.apply_overrides(c.load_config("experiments/gpt2.py:small"), {
    "model.n_layer": 2, "model.context": 256, "model.vocab_size": 8192,
    "model.attn_pdrop": 0.0, "train.batch_size": 8, "train.microbatches": 1})
topo = c.parse_topology("v5e-8")
devices = chips.topology_devices(topo)
out = {}
for kernel, fsdp in (("xla", False), ("splash", True)):
    k_cfg = c.apply_overrides(cfg, {"model.attention_impl": kernel, "mesh.fsdp": fsdp})
    r = c.compile_train_step(k_cfg, topo, devices)
    out[kernel] = {"attention": r.attention, "fits": r.fits, "collectives": r.hlo.collective_bytes,
                   "train_custom_calls": r.hlo_text.count('"tpu_custom_call"')}
trainer = loop.build_trainer(k_cfg, sharding.make_mesh(k_cfg, devices))  # splash, FSDP
ev = steps.jit_eval_step(k_cfg.model, trainer.mesh, trainer.param_shardings)
out["eval_custom_call"] = "tpu_custom_call" in ev.lower(
    *c.abstract_eval_inputs(trainer)).compile().as_text()
print(json.dumps(out))
"""


@needs_libtpu
def test_tpu_compile_both_kernels():
    out = run_python(["-c", TPU_STEPS])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr  # libtpu_env.quiet_libtpu
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["xla"]["attention"] == "xla" and r["splash"]["attention"] == "splash"
    assert r["xla"]["fits"] and r["splash"]["fits"], r
    # the Pallas kernel is a custom call in the train step and in the eval step on the mesh
    assert r["xla"]["train_custom_calls"] == 0 and r["splash"]["train_custom_calls"] > 0, r
    assert r["eval_custom_call"], r  # unbound, a multi-chip eval fell back to XLA
    # FSDP: weights all-gathered, gradients reduce-scattered
    assert {"all-gather", "reduce-scatter"} <= set(r["splash"]["collectives"]), r


@needs_libtpu
def test_libtpu_is_quiet_off_tpu_vms():
    out = run_python(["-c", "import gpt_jax.sample, jax; print(jax.devices()[0].platform)"])
    assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr[-2000:]
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "accelerator type" not in out.stderr
