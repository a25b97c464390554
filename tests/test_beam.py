"""Beam search token for token against transformers' `generate(num_beams=...)` on a random
imported GPT-2, and sampling past the context (the sliding window) against recomputation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import run_python, tiny_config

from gpt_jax import convert, sample
from gpt_jax import model as model_lib
from gpt_jax.sample import BeamConfig, SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)


def _params(model_cfg, seed=0):
    init = jax.jit(lambda key: model_lib.unbox(model_lib.init_params(model_cfg, key)))
    return init(jax.random.key(seed))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(HF model, our model config, our params): a random 2-layer GPT-2, context 64."""
    torch = pytest.importorskip("torch", reason="torch==2.13.0 (hf extra) is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers (hf extra)")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=97, bos_token_id=0,
        eos_token_id=0)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # sharper, less uniform predictions than the init
            p.add_(0.3 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("beam")
    hf.save_pretrained(str(root))
    cfg = convert.config_from_hf(convert.read_hf_config(str(root)), str(root))
    params = convert.params_from_hf(convert.load_hf_weights(str(root)), cfg.model)
    return hf, cfg.model, params


def hf_beam(hf, prompt, n, eot, beam):
    import torch
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, num_beams=beam.num_beams,
                          length_penalty=beam.length_penalty,
                          early_stopping=beam.early_stopping, do_sample=False,
                          eos_token_id=eot, pad_token_id=eot,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    ids = out[0, len(prompt):].tolist()
    return ids[:ids.index(eot)] if eot in ids else ids


@pytest.mark.parametrize("beam", [BeamConfig(4, 0.6, False), BeamConfig(3, 1.5, True)])
def test_beam_search_matches_transformers(gpt2, beam):
    """Batched, left-padded prompts; the end-of-text id is a token the model often picks,
    so hypotheses finish at different lengths and the stopping rules matter."""
    hf, cfg, params = gpt2
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 97, n).tolist() for n in (5, 11, 2, 8)]
    greedy = [hf_beam(hf, p, 12, -1, BeamConfig(1)) for p in prompts]
    eot = int(np.bincount(np.concatenate(greedy)).argmax())  # the most frequent greedy token
    got = sample.beam_generate(cfg, params, prompts, beam, 12, eot)
    want = [hf_beam(hf, p, 12, eot, beam) for p in prompts]
    assert got == want
    assert len({len(w) for w in want}) > 1  # finished at different lengths


def test_one_beam_is_greedy(gpt2):
    _, cfg, params = gpt2
    prompts = [[5, 6, 7], [9]]
    assert sample.beam_generate(cfg, params, prompts, BeamConfig(1), 10, eot_id=3) == \
        sample.generate(cfg, params, prompts, GREEDY, 10, eot_id=3)


def test_beam_config_errors():
    with pytest.raises(ValueError, match=r"num_beams=0 must be in \[1, 64\]"):
        BeamConfig(0)
    with pytest.raises(ValueError, match="num_beams=65"):
        BeamConfig(65)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamConfig(2, early_stopping="sometimes")


# ---------------------------------------------------------------- past the context

def _crop_greedy(cfg, params, ids, n):
    """nanoGPT's generate: the last `context` tokens through the model for every token."""
    apply = jax.jit(lambda b: model_lib.GPT(cfg).apply({"params": params}, b))
    ids = list(ids)
    for _ in range(n):
        window = ids[-cfg.context:]
        buf = np.zeros((1, cfg.context), np.int32)
        buf[0, :len(window)] = window
        ids.append(int(np.argmax(apply(buf)[0, len(window) - 1])))
    return ids[-n:]


def test_sampling_past_the_context_slides_the_window(capsys):
    """Dense and banded (ring-cache) layers; a left-padded row and a cut prompt."""
    cfg = tiny_config(attention_pattern="alternating", window=3, context=16).model
    params = jax.tree.map(lambda x: 3.0 * x, _params(cfg))  # less repetitive predictions
    prompts = [[1, 2, 3, 4, 5], list(range(1, 21))]  # 20 > context: cut, with a notice
    got = sample.generate(cfg, params, prompts, GREEDY, 20, eot_id=-1)
    assert [len(g) for g in got] == [20, 20]
    for ids, new in zip(prompts, got):
        assert new == _crop_greedy(cfg, params, ids, 20)
    err = capsys.readouterr().err
    assert err == "note: prompt 1 has 20 tokens; the model sees its last 16 (model.context)\n"


def test_cli_bad_beam_flag_fails_in_one_line(tmp_path):
    res = run_python(["-m", "gpt_jax.sample", f"--workdir={tmp_path}", "--num_beams=65"],
                     timeout=120)
    assert res.returncode == 2  # a usage error, found before anything is loaded
    assert res.stderr.strip() == "error: --num_beams=65 must be in [1, 64]"
