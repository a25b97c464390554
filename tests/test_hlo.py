"""HLO checks on CPU CI (in the spirit of MaxText's HLO-diff tests): what the compiled
train and eval steps of a scanned, FSDP-sharded GPT-3-style model do, read from the
optimized HLO that `gpt_jax.compile` compiles. The TPU-only properties (the splash custom
call, reduce-scatters) are checked in tests/test_compile.py where libtpu is installed."""

from __future__ import annotations

import json

import pytest
from conftest import run_python

# One process: 4 host devices, FSDP over data=4, scanned layers (pairs of a dense and a
# banded layer); train and eval steps with each attention kernel.
STEPS = """
import json, re, jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")
from gpt_jax import compile as c, hlo_cost, loop, sharding, steps
cfg = c.apply_overrides(c.load_config("experiments/gpt3.py:small"), {
    "model.context": 64, "model.n_layer": 4, "model.n_head": 4, "model.d_model": 128,
    "model.d_ff": 512, "model.vocab_size": 256, "model.window": 32, "train.batch_size": 8,
    "train.microbatches": 1, "mesh.fsdp": True})
out = {}
for kernel in ("xla", "splash"):
    k_cfg = c.apply_overrides(cfg, {"model.attention_impl": kernel})
    mesh = sharding.make_mesh(k_cfg, jax.devices()[:4])
    trainer = loop.build_trainer(k_cfg, mesh)
    train = trainer.train_step.lower(*c.abstract_inputs(trainer)).compile()
    eval_step = steps.jit_eval_step(k_cfg.model, mesh, trainer.param_shardings)
    ev = eval_step.lower(*c.abstract_eval_inputs(trainer)).compile()
    stacked = sorted({str(list(x.shape)) for x in jax.tree.leaves(trainer.abstract_params["h"])})
    def ops(text, opcodes):
        return [[d, i.opcode, str(list(hlo_cost.type_dims(i.type)))]
                for d, i in hlo_cost.loop_depths(text) if i.opcode in opcodes]
    t_text, e_text = train.as_text(), ev.as_text()
    out[kernel] = {
        "stacked": stacked,
        "gathers": ops(t_text, ("all-gather", "all-gather-start")),
        "converts": ops(t_text, ("convert",)),
        "splash": [bool(re.search(r"splash_(causal|band)", x)) for x in (t_text, e_text)],
        "partitions": [re.search(r"num_partitions=(\\d+)", x).group(1) for x in (t_text, e_text)],
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    out = run_python(["-c", STEPS])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_fsdp_gathers_each_layer_inside_the_layer_loop(compiled):
    for kernel, r in compiled.items():
        stacked = set(r["stacked"])  # [layers, ...]: the scanned weights
        # the weight matrices: FSDP splits their embed dimension (d_model 128) over data
        layer = {str(json.loads(s)[1:]) for s in stacked
                 if len(json.loads(s)) >= 3 and 128 in json.loads(s)[1:]}
        up_front = [g for g in r["gathers"] if g[0] == 0 and g[2] in stacked]
        assert not up_front, (kernel, up_front)  # never the whole stack before the loop
        in_loop = {g[2] for g in r["gathers"] if g[0] >= 1}
        assert layer <= in_loop, (kernel, layer - in_loop)  # every weight matrix, per layer


def test_no_copy_of_the_stacked_params_outside_the_loop(compiled):
    # params are float32, matmuls bfloat16: the casts happen per layer inside the loop,
    # so no whole-model copy in either dtype is materialised before or after it
    for kernel, r in compiled.items():
        stacked = set(r["stacked"])
        outside = [op for op in r["converts"] if op[0] == 0 and op[2] in stacked]
        assert not outside, (kernel, outside)


def test_eval_step_runs_on_the_training_mesh_with_its_kernel(compiled):
    for kernel, r in compiled.items():
        assert r["partitions"] == ["4", "4"], (kernel, r["partitions"])
        assert r["splash"] == [kernel == "splash"] * 2, (kernel, r["splash"])
