"""`python -m gpt_jax.plan`: layouts enumerated and pruned, ranking with ties, and (with
libtpu) a small plan compiled, ranked, cached and written as JSON."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import run_python

from gpt_jax import chips, config, model, plan
from gpt_jax import compile as compile_lib

NO_LIBTPU = importlib.util.find_spec("libtpu") is None


def gpt2_small():
    return compile_lib.load_config("experiments/gpt2.py:small")


def test_layouts_divide_heads_vocabulary_and_batch():
    cfg, topo = gpt2_small(), chips.parse_topology("v5e-8")
    cands = [c.settings for c in plan.candidates(cfg, topo)]
    assert {s["mesh.model"] for s in cands} == {1, 2, 4}  # 8 does not divide 12 heads
    for s in cands:
        data = 8 // s["mesh.model"]
        assert 512 % s["train.microbatches"] == 0
        assert (512 // s["train.microbatches"]) % data == 0
        assert s.get("model.vocab_size", 50257) % s["mesh.model"] == 0
        assert not (s["mesh.fsdp"] and data == 1)
    padded = {s["mesh.model"]: s.get("model.vocab_size") for s in cands}
    assert padded == {1: None, 2: 50432, 4: 50688}  # whole 128-lane rows per shard
    kernels = {(s["model.attention_impl"], s.get("model.splash_block_q")) for s in cands}
    assert kernels == {("xla", None)}  # GPT-2 trains with attention dropout: no kernel has it
    no_dropout = compile_lib.apply_overrides(cfg, {"model.attn_pdrop": 0.0})
    kernels = {(c.settings["model.attention_impl"], c.settings.get("model.splash_block_q"))
               for c in plan.candidates(no_dropout, topo)}
    assert kernels == {("xla", None), ("splash", 512), ("splash", 1024)}
    assert {s["model.remat"] for s in cands} == set(plan.REMATS)


def test_state_over_hbm_is_never_compiled():
    cfg = compile_lib.load_config("experiments/gpt3.py:175b")
    p = plan.plan(cfg, chips.parse_topology("v5e-8"), cache_dir=None, log=lambda s: None)
    # 175B x 12 bytes / 8 chips = 262 GB of state per chip, over 16 GiB for every layout
    assert p.pruned == len(plan.candidates(cfg, chips.parse_topology("v5e-8")))
    assert p.ranked == [] and p.not_fitting == []


def test_state_bytes_by_hand():
    cfg, topo = gpt2_small(), chips.parse_topology("v5e-8")
    n = model.count_params(model.unbox(model.abstract_params(cfg.model)))
    by = {c.label(): plan.state_bytes(cfg, topo, c, n) for c in plan.candidates(cfg, topo)}
    assert by["model=1 fsdp=False remat=none micro=1 xla"] == 124_439_808 * 12
    assert by["model=2 fsdp=True remat=none micro=1 xla"] == pytest.approx(
        (124_439_808 + 175 * 768) * 12 / 8)  # vocab 50257 -> 50432 pads 175 rows


def result(label: str, step: float, gib: float = 1.0, error: str | None = None):
    return plan.Result(f"--line {label}", label, gib * plan.GIB, 16 * plan.GIB,
                       (step, step * 0.8), (0.5, 0.6), "compute", (1.0, 1.2), error=error)


def test_rank_fits_with_headroom_and_names_ties():
    rows = [result("slow", 2.0), result("fast", 1.0), result("close", 1.1),
            result("big", 0.5, gib=15.5), result("oom", 0.1, error="RESOURCE_EXHAUSTED")]
    ranked, rest, ties = plan.rank(rows, headroom=0.05)
    assert [r.label for r in ranked] == ["fast", "close", "slow"]
    assert {r.label for r in rest} == {"big", "oom"}  # 15.5 GiB > 95% of 16
    assert ties == ["close"]  # 10% apart: inside the estimate's error
    text = plan.format_plan(plan.Plan(ranked, rest, 3, 4, ties, 0.05), gpt2_small(),
                            chips.parse_topology("v5e-8"))
    assert text.splitlines()[-1] == "--line fast"  # the winner's override line, last
    assert "Within the estimate's error" in text and "Blind spots" in text


def test_host_cpus_are_refused_in_one_line():
    with pytest.raises(config.ConfigError, match="topology=cpu:8"):
        plan.plan(gpt2_small(), chips.parse_topology("cpu:8"))


@pytest.mark.skipif(NO_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_plans_a_small_model_on_a_v5e_8(tmp_path):
    args = ["-m", "gpt_jax.plan", "--config=experiments/tiny.py:char", "--topology=v5e-8",
            "--config.model.context=128", "--config.model.n_layer=2",
            "--config.model.n_head=4", "--config.model.d_model=128",
            "--config.model.d_ff=512", "--config.train.batch_size=16", "--max_candidates=2",
            "--workers=1", f"--cache_dir={tmp_path / 'cache'}", f"--out={tmp_path / 'p.json'}"]
    out = run_python(args)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("--config.mesh.data=-1 --config.mesh.model=")
    assert "| 1 | model=" in out.stdout and "| 2 | model=" in out.stdout
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["winner"] == lines[-1] and len(saved["ranked"]) == 2
    again = run_python(args)  # the cache answers: nothing compiled
    assert again.returncode == 0 and "compiling 0 (2 cached" in again.stderr, again.stderr
    assert again.stdout.strip().splitlines()[-1] == lines[-1]


def test_both_scans_doubles_the_layouts_where_the_model_can_scan():
    cfg, topo = gpt2_small(), chips.parse_topology("v5e-8")
    plain = plan.candidates(cfg, topo)
    both = plan.candidates(cfg, topo, both_scans=True)
    assert len(both) == 2 * len(plain)
    assert {c.settings["model.scan_layers"] for c in both} == {False, True}
    assert len({c.label() for c in both}) == len(both)  # the label says which
    assert {c.line().endswith(f"--config.model.scan_layers={c.settings['model.scan_layers']}")
            for c in both} == {True}
    gpt3 = compile_lib.apply_overrides(compile_lib.load_config("experiments/gpt3.py:small"),
                                       {"model.n_layer": 3})  # alternating, odd: no scan
    assert {c.settings["model.scan_layers"] for c in plan.candidates(gpt3, topo, True)} == {
        False}


def test_muon_state_bound_is_one_moment():
    cfg, topo = gpt2_small(), chips.parse_topology("v5e-8")
    n = model.count_params(model.unbox(model.abstract_params(cfg.model)))
    cand = plan.candidates(cfg, topo)[0]
    adam = plan.state_bytes(cfg, topo, cand, n)
    muon = plan.state_bytes(compile_lib.apply_overrides(cfg, {"optim.optimizer": "muon"}),
                            topo, cand, n)
    assert muon == pytest.approx(adam * 8 / 12)
