"""HF GPT-2 import/export against transformers on a small random GPT-2 (nothing downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig

import jax
import numpy as np
import pytest
from conftest import run_python

from gpt_jax import checkpoint, convert, sample
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.workdir import Workdir, open_run

torch = pytest.importorskip("torch", reason="torch==2.13.0 (hf extra) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers (hf extra) not installed")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (hf extra) not installed")
pytest.importorskip("safetensors", reason="safetensors (hf extra) not installed")

STDLIB = sysconfig.get_paths()["stdlib"]
VOCAB, CONTEXT = 500, 64


def make_hf_gpt2(directory: str, seed: int = 0):
    """A random 2-layer GPT-2 (biases and LN params perturbed too) + a 500-entry BPE."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train([os.path.join(STDLIB, n) for n in ("textwrap.py", "string.py", "shlex.py")],
              vocab_size=VOCAB, min_frequency=2, special_tokens=[tokenizer_lib.EOT],
              show_progress=False)
    os.makedirs(directory, exist_ok=True)
    bpe.save_model(directory)
    eot = bpe.token_to_id(tokenizer_lib.EOT)
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=CONTEXT,
                                  vocab_size=VOCAB, bos_token_id=eot, eos_token_id=eot)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(directory)
    return hf


def hf_logits(hf, tokens_BxT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(tokens_BxT, dtype=torch.long)).logits.numpy()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf_logits(hf, np.array([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def our_logits(cfg, params, tokens_BxT: np.ndarray) -> np.ndarray:
    return np.asarray(model_lib.GPT(cfg.model).apply({"params": params}, tokens_BxT))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(hf model, hf dir, imported workdir)."""
    root = tmp_path_factory.mktemp("convert")
    hf = make_hf_gpt2(str(root / "hf"))
    convert.import_hf(str(root / "hf"), str(root / "wd"))
    return hf, str(root / "hf"), str(root / "wd")


def test_import_logits_greedy_and_workdir(imported):
    hf, hf_dir, workdir = imported
    run = open_run(workdir)  # the one way every tool opens a run
    cfg, params, tok = run.cfg, run.params, run.tokenizer
    m = cfg.model
    assert (m.n_layer, m.d_model, m.n_head, m.d_ff, m.context, m.vocab_size) == (
        2, 64, 4, 256, CONTEXT, VOCAB)
    assert m.norm == "pre" and m.resid_pdrop == 0.1 and cfg.data.tokenizer == "gpt2"
    assert isinstance(tok, tokenizer_lib.GPT2Tokenizer) and tok.vocab_size == VOCAB
    for name in convert.TOKENIZER_FILES:
        assert os.path.exists(os.path.join(workdir, name))
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, CONTEXT))
    np.testing.assert_allclose(our_logits(cfg, params, tokens), hf_logits(hf, tokens),
                               atol=1e-4, rtol=1e-4)
    prompt = tok.encode("def split(s):\n    return")
    want = hf_greedy(hf, prompt, 32)
    got = sample.generate(m, params, [prompt], sample.SamplingConfig(temperature=0.0), 32,
                          tok.eot_id, vocab=tok.vocab_size)[0]
    if tok.eot_id in want:  # our sampler stops at the end of text
        want = want[:want.index(tok.eot_id)]
    assert got == want


def test_pytorch_bin_matches_safetensors(imported, tmp_path):
    hf, hf_dir, _ = imported
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # 'transformer.' + lm_head
    shutil.copy(os.path.join(hf_dir, "config.json"), tmp_path / "config.json")
    from_bin = convert.load_hf_weights(str(tmp_path))
    from_st = convert.load_hf_weights(hf_dir)
    assert sorted(from_bin) == sorted(from_st)
    for name, value in from_st.items():
        np.testing.assert_array_equal(from_bin[name], value)
    cfg = convert.config_from_hf(convert.read_hf_config(str(tmp_path)), str(tmp_path))
    params = convert.params_from_hf(from_bin, cfg.model)
    tokens = np.arange(CONTEXT)[None] % VOCAB
    np.testing.assert_allclose(our_logits(cfg, params, tokens), hf_logits(hf, tokens),
                               atol=1e-4, rtol=1e-4)


def test_export_round_trip_scanned(imported, tmp_path):
    hf, hf_dir, _ = imported
    workdir, out = str(tmp_path / "wd"), str(tmp_path / "out")
    cfg = convert.import_hf(hf_dir, workdir, scan_layers=True)
    assert cfg.model.scan_layers
    result = run_python(["-m", "gpt_jax.convert", f"--workdir={workdir}", f"--to_hf={out}"],
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, CONTEXT))
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(hf, tokens),
                               atol=1e-5, rtol=1e-5)
    ref = transformers.GPT2Tokenizer(os.path.join(out, "vocab.json"),
                                     os.path.join(out, "merges.txt"))
    assert ref.encode("x = 1") == tokenizer_lib.load_tokenizer(workdir).encode("x = 1")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == ref.convert_tokens_to_ids(tokenizer_lib.EOT)


@pytest.mark.parametrize("field,value,match", [
    ("norm", "post", "post-norm"), ("attention_pattern", "alternating", "banded")])
def test_export_refuses_non_gpt2(tmp_path, field, value, match):
    from conftest import tiny_config
    cfg = tiny_config(**{field: value})
    Workdir(tmp_path).write_config(cfg)
    with pytest.raises(convert.ConversionError, match=match):
        convert.export_hf(str(tmp_path), str(tmp_path / "out"))


def test_import_refuses_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "activation_function": "relu", "n_layer": 1}))
    with pytest.raises(convert.ConversionError, match="activation_function"):
        convert.read_hf_config(str(tmp_path))


def test_fine_tune_from_import(imported, tmp_path):
    """`gpt_jax.train` resumes the imported step-0 checkpoint (params and optimizer state)."""
    from gpt_jax import train
    _, hf_dir, _ = imported
    workdir = str(tmp_path / "wd")
    cfg = convert.import_hf(hf_dir, workdir)
    shapes = model_lib.unbox(model_lib.abstract_params(cfg.model))
    before, _ = checkpoint.restore_params(workdir, shapes)
    d, t = cfg.data, cfg.train
    d.source, d.text_glob = "text", os.path.join(STDLIB, "json", "*.py")
    d.data_dir, d.num_workers = str(tmp_path / "data"), 1
    t.steps, t.batch_size, t.log_every, t.eval_every, t.eval_batches = 2, 2, 1, 2, 1
    t.ckpt_every, t.sample_tokens = 2, 4
    cfg.optim.warmup_steps, cfg.optim.peak_lr = 0, 1e-4
    final = train.train(cfg, workdir)
    assert np.isfinite(final["loss"])
    after, meta = checkpoint.restore_params(workdir, shapes)
    assert meta["step"] == 2
    delta = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(after), jax.tree.leaves(before)))
    assert 0 < delta < 1e-2  # a couple of small Adam steps from the imported weights
