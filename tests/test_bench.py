"""The benchmark's figures are computed from real timings, and the PyTorch reference
trains the same model (equal step-0 loss from the same weights and batch)."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import REPO, tiny_config

from gpt_jax import bench, config


def test_train_bench_figures_and_profile(tmp_path):
    cfg = tiny_config()
    cfg.train.batch_size = 4
    r = bench.run_train(config.validate(cfg), repeats=2, steps=2, sampler=True,
                        profile_dir=str(tmp_path / "profile"))
    s = r["step_time_s"]
    assert 0 < s["min"] <= s["median"] <= s["max"]
    assert r["tokens_per_s"] == pytest.approx(4 * 16 / s["median"])
    assert 0 < r["mfu"] < 1 and r["peak_source"].startswith("measured")
    assert r["memory_bytes"]["peak"] > r["memory_bytes"]["argument"] > 0
    assert r["sampler_tokens_per_s"] > 0
    events = {e["event"] for e in r["profile_top"]}
    assert any("train_step" in e for e in events), events  # XLA's execution of the step
    assert "MFU" in bench.format_train(r) and "profile" in bench.format_train(r)


def test_torch_reference_matches_gpt_jax():
    pytest.importorskip("torch", reason="torch==2.13.0 (hf extra) is not installed")
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import compare

    r = compare.compare("nanogpt", repeats=1, steps=1, use_compile=False, batch=2)
    assert r["loss0_abs_diff"] < 1e-4, r
    assert r["jax"]["step_s"] > 0 and r["torch_eager"]["step_s"] > 0
    assert r["ratio_jax_over_torch_eager"] == pytest.approx(
        r["torch_eager"]["step_s"] / r["jax"]["step_s"])


def test_attention_bench_times_xla_and_checks_splash():
    r = bench.run_attention(d_model=64, n_head=2, batch=1, window=64, contexts=(128,),
                            repeats=1)
    assert r["platform"] == "cpu" and [row["impl"] for row in r["rows"]] == ["xla"]
    row = r["rows"][0]
    assert row["dense_s"]["median"] > 0 and row["banded_s"]["median"] > 0
    assert row["speedup"] == pytest.approx(row["dense_s"]["median"] / row["banded_s"]["median"])
    [check] = r["checks"]  # splash in interpret mode: a correctness check, never a time
    assert check["context"] == 128 and 0 <= check["max_abs_diff_vs_xla"] < 1e-4, check
    assert "splash (interpret mode)" in bench.format_attention(r)


def _tiny_store(path, n=5000, shard_tokens=1024):
    """A store of one source written directly (no tokenizer): shards + manifest."""
    import json

    import numpy as np

    from gpt_jax.data import store

    splits = {}
    for split in ("train", "val"):
        w = store.ShardWriter(str(path), "toy", split, np.uint16, shard_tokens)
        w.write(np.arange(n, dtype=np.uint16) % 61)
        splits[split] = store.split_record(w.close(), 1, n)
    manifest = {"format": store.FORMAT, "version": store.VERSION, "dtype": "uint16",
                "shard_tokens": shard_tokens, "tokenizer": {"kind": "char"},
                "sources": {"toy": {"splits": splits}}}
    (path / store.MANIFEST).write_text(json.dumps(manifest))
    return str(path)


def test_input_mode_runs_on_a_tiny_store(tmp_path):
    """--mode=input's pieces: the AOT table's targets, and reads with prefetch on and off
    (no timing is asserted)."""
    targets = bench.input_targets()
    assert [t["config"] for t in targets] == [c for c, _, _ in bench.INPUT_TARGETS]
    assert all(t["step_s"] > 0 and t["consume_tokens_per_s"] > 0 for t in targets)
    tokens = bench.open_tokens(_tiny_store(tmp_path))
    shapes = bench.input_shapes(16, 4, with_targets=False)
    shapes.append({"name": "needs 1 window/s", "context": 32, "rows": 2, "hosts": 3,
                   "consume_windows_per_s": 1.0, "consume_tokens_per_s": 32.0})
    r = bench.run_input(tokens, shapes, depths=(0, 2), seconds=0.02, repeats=1, where="tiny")
    assert [(row["context"], row["depth"]) for row in r["rows"]] == [
        (16, 0), (16, 2), (32, 0), (32, 2)]
    assert all(row["windows_per_s"] > 0 for row in r["rows"])
    assert r["rows"][-1]["ratio"] == pytest.approx(r["rows"][-1]["windows_per_s"])
    assert "windows/s" in bench.format_input(r)
