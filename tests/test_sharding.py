"""Sharding: every mesh shape and host count trains the same, checkpoints move between
meshes, params are laid out per the rules table, and bad meshes fail before compiling.

Each check runs the trainer in a subprocess with its own XLA_FLAGS (forced host CPU
devices), so the device count of this process never changes. Several meshes share one
subprocess to pay JAX's start-up and the data preparation once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from conftest import REPO, run_python

from gpt_jax import metrics

CORPUS = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
STEPS = 4
# Divisible by every model axis used below (8): heads, d_ff, vocab (char tokenizer: 256).
OVERRIDES = {
    "model.vocab_size": 256, "model.context": 32, "model.n_layer": 2, "model.n_head": 8,
    "model.d_model": 64, "model.d_ff": 128, "model.embd_pdrop": 0.0, "model.resid_pdrop": 0.0,
    "model.attn_pdrop": 0.0, "model.dtype": "float32", "optim.peak_lr": 1e-3,
    "optim.warmup_steps": 0, "train.batch_size": 8,
    "train.steps": STEPS,
    "train.log_every": 1, "train.eval_every": 1000, "train.eval_batches": 1,
    "train.ckpt_every": 1000, "train.sample_tokens": 0, "data.source": "text",
    "data.text_glob": CORPUS, "data.tokenizer": "char",
}
MESHES = [  # name: mesh overrides (8 devices)
    ("8x1", {"mesh.data": 8, "mesh.model": 1}),
    ("4x2", {"mesh.data": 4, "mesh.model": 2}),
    ("2x4", {"mesh.data": 2, "mesh.model": 4}),
    ("1x8", {"mesh.data": 1, "mesh.model": 8}),
    ("4x2-fsdp", {"mesh.data": 4, "mesh.model": 2, "mesh.fsdp": True}),
]

# The config the two-process run loads (Muon and all), so every side trains the same thing.
LOAD_TINY = """
import importlib.util
spec = importlib.util.spec_from_file_location("tiny", "experiments/tiny.py")
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)
"""

# argv: root dir, data dir, JSON {run name: overrides}. Runs named in FULL go through
# gpt_jax.train.train in <root>/<name> (eval, checkpoint, metrics); the others only
# through what its loop does per step (the same init, batches, rng and jitted step),
# which skips the eval and checkpoint compiles. Prints {name: losses} as the last line.
TRAIN_MESHES = """
import json, sys
import jax
from gpt_jax import config, data, loop, metrics, optim, sharding, train
root, data_dir, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
""" + LOAD_TINY + """
FULL = ("1dev", "8x1")

def steps_only(cfg):
    cfg = config.validate(cfg)
    mesh = sharding.make_mesh(cfg)
    sharding.check_batch(cfg, mesh)
    corpus = data.prepare(cfg)
    trainer = loop.build_trainer(cfg, mesh)
    state, rng = trainer.init_state(jax.random.key(cfg.seed)), jax.random.key(cfg.seed + 1)
    losses = []
    for step in range(cfg.train.steps):
        batch = loop.global_batch(train.step_windows(cfg, corpus, step), mesh)
        state, out = trainer.train_step(state, batch, rng, optim.microbatches_at(cfg, step))
        losses.append(float(out["loss"]))
    return losses

out = {}
for name, overrides in runs.items():
    cfg = tiny.get_config("char")
    for key, value in {**overrides, "data.data_dir": data_dir}.items():
        section, field = key.split(".")
        cfg[section][field] = value
    if name in FULL:
        train.train(cfg, f"{root}/{name}")
        out[name] = [r["loss"] for r in metrics.read_metrics(f"{root}/{name}") if "loss" in r]
    else:
        out[name] = steps_only(cfg)
print(json.dumps(out))
"""


def device_env(n: int) -> dict:
    """n forced host devices; LLVM optimisation off: compiles a third faster, same losses."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n} "
                         "--xla_backend_optimization_level=0"}


def last_json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_meshes(root, data_dir, runs: dict, devices: int) -> dict:
    args = ["-c", TRAIN_MESHES, str(root), str(data_dir), json.dumps(runs)]
    return last_json(run_python(args, env=device_env(devices)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of the tiny config on 1 device and on every 8-device mesh; the data dir."""
    root = tmp_path_factory.mktemp("meshes")
    data_dir = root / "data"
    # one device first: it tokenizes the corpus that every later run (and process) reuses
    losses = run_meshes(root, data_dir, {"1dev": OVERRIDES}, devices=1)
    losses.update(run_meshes(root, data_dir, {name: {**OVERRIDES, **mesh}
                                              for name, mesh in MESHES}, devices=8))
    return {"root": root, "data_dir": data_dir, "losses": losses}


def test_every_mesh_shape_trains_the_same(reference):
    losses = reference["losses"]
    assert len(losses["1dev"]) == STEPS and losses["1dev"][-1] < losses["1dev"][0]
    for name, _ in MESHES:
        np.testing.assert_allclose(losses[name], losses["1dev"], rtol=1e-5, err_msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_processes(args: list[str], port: int, devices: int, n: int = 2
                    ) -> list[subprocess.Popen]:
    """`python args` as n processes of one jax.distributed run (gloo on CPU)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(device_env(devices))
    return [subprocess.Popen([sys.executable, *args, f"--coordinator_address=localhost:{port}",
                              f"--num_processes={n}", f"--process_id={i}"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(n)]


def finish(procs: list[subprocess.Popen], timeout: int = 400) -> list[tuple[str, str]]:
    """Waits for every process; each must exit 0. Returns their (stdout, stderr)."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    return outs


def test_two_processes_train_the_same_as_one(reference, tmp_path):
    workdir = tmp_path / "multihost"
    port = free_port()
    args = ["-m", "gpt_jax.train", "--config=experiments/tiny.py:char", f"--workdir={workdir}",
            f"--config.data.data_dir={reference['data_dir']}", "--config.mesh.model=2"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    procs = start_processes(args, port, devices=4)
    outs = finish(procs)
    losses = [r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r]
    np.testing.assert_allclose(losses, reference["losses"]["8x1"], rtol=1e-5)
    np.testing.assert_allclose(losses, reference["losses"]["1dev"], rtol=1e-5)
    # one metrics writer (process 0: its rows are not doubled), one complete checkpoint
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"loss"' in r]) == STEPS
    steps = [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert steps == [str(STEPS)]
    assert "params;" in outs[0][0] and "params;" not in outs[1][0]  # only process 0 prints


# argv: workdir of the 8x1 run, JSON overrides. Restores its checkpoint onto 8x1 and 2x4
# and builds a 2x4 fsdp state; prints values, shardings and specs.
RESTORE = """
import json, sys
import jax, numpy as np
from gpt_jax import checkpoint as ckpt_lib, config, loop, sharding
workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
""" + LOAD_TINY + """

def trainer_on(data, model, fsdp=False):
    cfg = tiny.get_config("char")
    for key, value in {**overrides, "mesh.data": data, "mesh.model": model,
                       "mesh.fsdp": fsdp}.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return loop.build_trainer(cfg, sharding.make_mesh(cfg))

def restore(trainer):
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
    out = ckpt.restore(
        ckpt.latest_step(),
        ckpt_lib.abstract_with_shardings(trainer.abstract_params, trainer.param_shardings),
        ckpt_lib.abstract_with_shardings(trainer.abstract_opt_state, trainer.opt_shardings))
    ckpt.close()
    return out

def specs(tree):
    return {jax.tree_util.keystr(p): [str(a) for a in x.sharding.spec]
            for p, x in jax.tree_util.tree_leaves_with_path(tree) if x.ndim}

t81, t24 = trainer_on(8, 1), trainer_on(2, 4)
a, b = restore(t81), restore(t24)
same_values = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
on_target = all(x.sharding == s for x, s in zip(
    jax.tree.leaves(b["params"]) + jax.tree.leaves(b["opt_state"]),
    jax.tree.leaves(t24.param_shardings) + jax.tree.leaves(t24.opt_shardings)))
fsdp = trainer_on(2, 4, fsdp=True)
state = fsdp.init_state(jax.random.key(0))
print(json.dumps({"same_values": same_values, "on_target": on_target,
                  "mesh_of_restored": dict(jax.tree.leaves(b["params"])[0].sharding.mesh.shape),
                  "params_2x4": specs(b["params"]), "opt_2x4": specs(b["opt_state"]),
                  "params_fsdp": specs(state["params"]), "opt_fsdp": specs(state["opt_state"]),
                  "step": b["meta"]["step"]}))
"""


def test_checkpoint_moves_between_meshes_and_params_follow_the_rules(reference):
    out = last_json(run_python(["-c", RESTORE, str(reference["root"] / "8x1"),
                                json.dumps(OVERRIDES)], env=device_env(8)))
    assert out["step"] == STEPS
    assert out["same_values"] and out["on_target"]
    assert out["mesh_of_restored"] == {"data": 2, "model": 4}
    p, f = out["params_2x4"], out["params_fsdp"]
    qkv = "['h_0']['attn']['qkv']['kernel']"  # embed x 3 x heads x kv
    assert p[qkv] == ["None", "None", "model", "None"]
    assert p["['h_0']['attn']['proj']['kernel']"] == ["model", "None", "None"]  # heads first
    assert p["['h_0']['mlp']['fc']['kernel']"] == ["None", "model"]
    assert p["['h_0']['mlp']['proj']['kernel']"] == ["model", "None"]
    assert p["['wte']['embedding']"] == ["model", "None"]  # vocab-parallel
    assert p["['wpe']['embedding']"] == ["None", "None"]
    # fsdp: the embed dimension is split over data as well
    assert f[qkv] == ["data", "None", "model", "None"]
    assert f["['h_0']['mlp']['proj']['kernel']"] == ["model", "data"]
    assert f["['wte']['embedding']"] == ["model", "data"]
    # Adam moments are laid out like their params
    for opt, params in ((out["opt_2x4"], p), (out["opt_fsdp"], f)):
        mu = {k: v for k, v in opt.items() if ".mu" in k and qkv in k}
        assert mu and all(v == params[qkv] for v in mu.values())


# argv: root, JSON {name: overrides}; for each, train.train must raise ConfigError before
# it prepares data or compiles anything; prints {name: message}.
BAD = """
import json, sys
import jax
from gpt_jax import config, train
root, runs = sys.argv[1], json.loads(sys.argv[2])
jax.jit = None  # anything that compiles would now fail with a TypeError
out = {}
for name, overrides in runs.items():
    cfg = config.base_config()
    for key, value in overrides.items():
        section, field = key.split(".")
        cfg[section][field] = value
    try:
        train.train(cfg, f"{root}/{name}")
    except config.ConfigError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def test_bad_meshes_fail_before_compiling(tmp_path):
    bad = {
        "product": ({"mesh.data": 3, "mesh.model": 2}, ["mesh.data=3", "mesh.model=2", "8"]),
        "heads": ({"mesh.model": 8, "model.n_head": 4, "model.d_model": 64},
                  ["model.n_head=4", "mesh.model=8"]),
        "d_ff": ({"mesh.model": 8, "model.d_ff": 100}, ["model.d_ff=100", "mesh.model=8"]),
        "batch": ({"mesh.data": 8, "train.batch_size": 12}, ["train.batch_size=12", "8"]),
        "vocab": ({"mesh.model": 8, "model.vocab_size": 250},
                  ["model.vocab_size=250", "mesh.model=8", "model.vocab_size=256"]),
    }
    runs = {name: {**OVERRIDES, "data.data_dir": str(tmp_path / "data"), **o}
            for name, (o, _) in bad.items()}
    out = last_json(run_python(["-c", BAD, str(tmp_path), json.dumps(runs)],
                               env=device_env(8)))
    for name, (_, needles) in bad.items():
        assert name in out, f"{name}: no ConfigError"
        for needle in needles:
            assert needle in out[name], (name, out[name])
    assert not (tmp_path / "data").exists()  # failed before preparing data
