"""The MFU formula against hand calculations, and the chip table against vendor figures."""

from __future__ import annotations

import ml_collections
import pytest

from gpt_jax import chips, flops
from gpt_jax import compile as compile_lib


def gpt(n_layer: int, d_model: int, vocab: int, context: int, pattern: str = "dense",
        window: int = 256) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "n_layer": n_layer, "d_model": d_model, "vocab_size": vocab, "context": context,
        "attention_pattern": pattern, "window": window})


def params(n_layer: int, d: int, vocab: int, context: int) -> int:
    """GPT-2 parameters by hand: token + position tables, per layer qkv + proj (4d^2 + 4d),
    MLP (8d^2 + 5d), two layer norms (4d); the final layer norm (2d); tied logits."""
    return vocab * d + context * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def test_gpt2_small_by_hand():
    n = params(12, 768, 50257, 1024)
    assert n == 124_439_808  # the figure nanoGPT and HF print for GPT-2 small
    # 6 x (N - 1024 x 768 position table) + 12 x 12 layers x 768 x 1024
    # = 6 x 123,653,376 + 113,246,208 = 855,166,464 (nanoGPT's estimate_mfu: the same)
    assert flops.flops_per_token(gpt(12, 768, 50257, 1024), n) == 855_166_464


@pytest.mark.parametrize("pattern,expected", [
    # 6 x 174,579,093,504 + 12 x 12288 x 96 x 2048 (every layer attends over T)
    ("dense", 1_047_474_561_024 + 28_991_029_248),
    # GPT-3's alternating layers: 48 x 2048 + 48 x 256 keys, 12 x 12288 x 110,592
    ("alternating", 1_047_474_561_024 + 16_307_453_952)])
def test_gpt3_175b_by_hand(pattern, expected):
    n = params(96, 12288, 50257, 2048)
    assert n == 174_604_259_328  # Brown et al. 2020, Table 2.1: "175.0B"
    assert flops.flops_per_token(gpt(96, 12288, 50257, 2048, pattern), n) == expected


def test_the_model_counts_the_same_parameters():
    cfg = compile_lib.load_config("experiments/gpt2.py:small")
    assert flops.flops_per_token(cfg.model) == 855_166_464  # counted from the real params


def test_mfu_by_hand():
    # GPT-2 small at 1M tokens/s on 8 v5e chips: 8.55e14 / (8 x 1.97e14) = 54.3%
    assert flops.mfu(1e6, 855_166_464, 197e12, 8) == pytest.approx(0.54262, abs=1e-5)
    # GPT-3 175B (banded) on 1024 v5p chips at 100k tokens/s: 1.0638e17 / 4.70e17 = 22.6%
    fpt = 1_047_474_561_024 + 16_307_453_952
    assert flops.mfu(1e5, fpt, 459e12, 1024) == pytest.approx(0.226328, abs=1e-5)


# As printed by the vendors (units of their pages): peak dense bf16 TFLOP/s, HBM GiB (GB
# on NVIDIA's sheets), HBM GB/s, and the inter-chip figure the table halves.
# TPUs: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e ("System architecture": peak
# compute per chip, HBM capacity and bandwidth, bidirectional ICI bandwidth per chip; v4:
# 1.1 PB/s all-reduce bandwidth per 4096-chip Pod). GPUs: NVIDIA A100 / H100 / H200 data
# sheets, SXM, dense (no sparsity), NVLink both ways.
VENDOR = {
    "v4": (275, 32, 1200, ("pod", 1.1e15, 4096)),
    "v5e": (197, 16, 819, ("bidirectional", 400e9)),
    "v5p": (459, 95, 2765, ("bidirectional", 1200e9)),
    "v6e": (918, 32, 1600, ("bidirectional", 800e9)),
    "a100": (312, 80, 2039, ("bidirectional", 600e9)),
    "h100": (989, 80, 3350, ("bidirectional", 900e9)),
    "h200": (989, 141, 4800, ("bidirectional", 900e9)),
}


@pytest.mark.parametrize("name", sorted(VENDOR))
def test_chip_table_matches_vendor_figures(name):
    tflops, hbm, hbm_gbs, ici = VENDOR[name]
    chip = chips.CHIPS[name]
    assert chip.peak_flops == tflops * 1e12
    assert chip.hbm_gib == hbm and chip.hbm_bw == hbm_gbs * 1e9
    sent = ici[1] / ici[2] if ici[0] == "pod" else ici[1] / 2  # what one chip sends
    assert chip.ici_bw == pytest.approx(sent)


def test_every_chip_is_checked():
    assert set(VENDOR) == set(chips.CHIPS)
