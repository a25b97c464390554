"""Parameter counts of every paper config, from shapes alone (jax.eval_shape)."""

from __future__ import annotations

import pytest
from conftest import run_python
from test_optim import experiment

from gpt_jax import config as config_lib
from gpt_jax import flops, params

GPT2 = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080,
        "xl": 1_557_611_200}
# Table 2.1 rounds; its shapes give these sizes. Table 2.1's names are within 2%
# of them (medium 350M vs 355.9M, xl 1.3B vs 1.316B, 2.7B vs 2.652B, 13B vs
# 12.853B); small, large, 6.7B and 175B within 1%.
GPT3 = {"small": (125e6, 0.01), "medium": (350e6, 0.02), "large": (760e6, 0.01),
        "xl": (1.3e9, 0.02), "2.7b": (2.7e9, 0.02), "6.7b": (6.7e9, 0.01),
        "13b": (13.0e9, 0.02), "175b": (175.0e9, 0.01)}


@pytest.mark.parametrize("size", GPT2)
def test_gpt2_exact(size):
    assert params.total(config_lib.validate(experiment("gpt2", size))) == GPT2[size]


@pytest.mark.parametrize("size", GPT3)
def test_gpt3_table(size):
    expected, tol = GPT3[size]
    assert params.total(config_lib.validate(experiment("gpt3", size))) == pytest.approx(
        expected, rel=tol)


def test_gpt3_13b_matches_table_d1():
    # Table D.1 gives 12,850M for 13B, which d_model 5120 reproduces.
    assert params.total(experiment("gpt3", "13b")) == pytest.approx(12_850e6, rel=0.001)


def test_gpt1():
    assert params.total(experiment("gpt1")) == 116_534_784  # the released checkpoint


def test_flops_per_token_counts_banded_window():
    dense = experiment("gpt2", "small")
    n = params.total(dense)
    attn = 12 * 12 * 768 * 1024
    assert flops.flops_per_token(dense.model) == 6 * (n - 1024 * 768) + attn
    g3 = experiment("gpt3", "small")
    n3 = params.total(g3)
    attn3 = 12 * 768 * (6 * 2048 + 6 * 256)
    assert flops.flops_per_token(g3.model) == 6 * (n3 - 2048 * 768) + attn3


def test_cli_prints_count():
    out = run_python(["-m", "gpt_jax.params", "--config=experiments/gpt3.py:175b"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gpt3-175b: 174,604,259,328 parameters" in out.stdout
