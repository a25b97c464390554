"""HF openai-gpt (GPT-1) import/export and fine-tuning, against transformers on a small
random OpenAIGPTLMHeadModel of an odd shape (nothing downloaded)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from test_gpt1_tokenizer import train_gpt1_bpe

from gpt_jax import convert, finetune, sample
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.workdir import Workdir, WorkdirError, open_run

torch = pytest.importorskip("torch", reason="torch==2.13.0 (hf extra) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers (hf extra) not installed")
pytest.importorskip("safetensors", reason="safetensors (hf extra) not installed")

CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")
CONTEXT, N_HEAD, D_MODEL = 20, 5, 40  # 5 heads of 8: an odd head count, a short context


def make_hf_gpt1(directory: str, vocab_size: int, std: float = 0.1, seed: int = 0):
    """A random 2-layer OpenAIGPTLMHeadModel, every weight redrawn N(0, std) (LayerNorm
    scales around 1) so that mapping mistakes show in the logits."""
    torch.manual_seed(seed)
    cfg = transformers.OpenAIGPTConfig(vocab_size=vocab_size, n_positions=CONTEXT, n_embd=D_MODEL,
                                       n_layer=2, n_head=N_HEAD)
    hf = transformers.OpenAIGPTLMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(std * torch.randn_like(p) + (1.0 if "ln_" in name and "weight" in name
                                                 else 0.0))
    hf.save_pretrained(directory)
    return hf


def hf_logits(hf, tokens_BxT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(tokens_BxT, dtype=torch.long)).logits.numpy()


def our_logits(cfg, params, tokens_BxT: np.ndarray) -> np.ndarray:
    return np.asarray(model_lib.GPT(cfg.model).apply({"params": params}, tokens_BxT))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(hf model, its directory: safetensors + config + GPT-1 vocab.json/merges.txt)."""
    root = str(tmp_path_factory.mktemp("gpt1") / "hf")
    train_gpt1_bpe(root, vocab_size=300)
    vocab = len(tokenizer_lib.load_tokenizer(root).encoder)
    return make_hf_gpt1(root, vocab), root


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gpt1wd") / "wd")
    convert.import_hf(hf_dir[1], workdir)
    return workdir


def test_import_logits_greedy_and_workdir(hf_dir, imported):
    hf, _ = hf_dir
    run = open_run(imported)
    cfg, params, tok = run.cfg, run.params, run.tokenizer
    m = cfg.model
    assert (m.norm, m.n_layer, m.n_head, m.d_model, m.d_ff, m.context) == (
        "post", 2, N_HEAD, D_MODEL, 4 * D_MODEL, CONTEXT)
    assert "ln_f" not in params and cfg.name == f"gpt1-hf-2x{D_MODEL}"
    assert cfg.data.tokenizer == "gpt1" and isinstance(tok, tokenizer_lib.GPT1Tokenizer)
    assert tok.vocab_size == m.vocab_size
    rng = np.random.default_rng(0)
    for tokens in (rng.integers(0, m.vocab_size, (3, 7)), rng.integers(0, m.vocab_size,
                                                                      (2, CONTEXT))):
        want = hf_logits(hf, tokens)
        assert np.abs(want).max() > 1.0  # large enough for mapping errors to show
        np.testing.assert_allclose(our_logits(cfg, params, tokens), want, atol=1e-4, rtol=0)
    prompt = tok.encode("def split(s):")
    n = CONTEXT - len(prompt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    if tok.eot_id in want:  # our sampler stops at the end of text
        want = want[:want.index(tok.eot_id)]
    got = sample.generate(m, params, [prompt], sample.SamplingConfig(temperature=0.0), n,
                          tok.eot_id, vocab=tok.vocab_size)[0]
    assert got == want and len(got) > 3


def test_pytorch_bin_scanned_and_export_round_trip(hf_dir, tmp_path):
    hf, root = hf_dir
    bin_dir, workdir, out = tmp_path / "bin", str(tmp_path / "wd"), str(tmp_path / "out")
    bin_dir.mkdir()
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")  # 'transformer.' + lm_head
    for name in ("config.json", *convert.TOKENIZER_FILES):
        shutil.copy(os.path.join(root, name), bin_dir / name)
    cfg = convert.import_hf(str(bin_dir), workdir, scan_layers=True)
    assert cfg.model.scan_layers
    hf_out = convert.export_hf(workdir, out)
    assert hf_out["model_type"] == "openai-gpt" and hf_out["afn"] == "gelu"
    back = transformers.OpenAIGPTLMHeadModel.from_pretrained(out).eval()
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, CONTEXT))
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(hf, tokens), atol=1e-5,
                               rtol=0)
    ref = transformers.OpenAIGPTTokenizer.from_pretrained(out)
    text = "Imported, exported: the same BPE!"
    assert ref.encode(text) == tokenizer_lib.load_tokenizer(workdir).encode(text)
    again = convert.config_from_hf(convert.read_hf_config(out), out)
    params = convert.params_from_hf(convert.load_hf_weights(out), again.model)
    np.testing.assert_allclose(our_logits(again, params, tokens), hf_logits(hf, tokens),
                               atol=1e-4, rtol=0)


def test_export_refuses_what_gpt1_cannot_hold(tmp_path):
    from conftest import tiny_config
    Workdir(tmp_path).write_config(tiny_config(norm="post", d_ff=96))
    with pytest.raises(convert.ConversionError, match=r"model.d_ff=96: .* 4 \* d_model = 128"):
        convert.export_hf(str(tmp_path), str(tmp_path / "out"))


def write_config(directory, **fields) -> str:
    base = {"model_type": "openai-gpt", "vocab_size": 50, "n_positions": CONTEXT,
            "n_embd": D_MODEL, "n_layer": 2, "n_head": N_HEAD, "afn": "gelu"}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**base, **fields}, f)
    return str(directory)


@pytest.mark.parametrize("fields,match", [
    ({"model_type": "bert"}, r"config.json: cannot import model_type='bert'"),
    ({"afn": "relu"}, r"config.json: cannot import: afn='relu'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"n_embd": 42}, "n_embd=42 is not divisible by n_head=5"),
    ({"n_layer": None}, "n_layer=None"),
])
def test_import_refuses_bad_configs(tmp_path, fields, match):
    with pytest.raises(convert.ConversionError, match=match):
        convert.read_hf_config(write_config(tmp_path, **fields))


@pytest.mark.parametrize("fields,match", [
    ({"vocab_size": 77}, r"model.safetensors: tokens_embed.weight has shape \(\d+, 40\), "
                         r"but config.json's vocab_size=77 needs \(77, 40\)"),
    ({"n_positions": 16}, r"positions_embed.weight has shape \(20, 40\), but config.json's "
                          r"n_positions=16"),
    ({"n_layer": 3}, r"model.safetensors: no tensor h.2.ln_1.weight \(12 missing; "
                     r"config.json has n_layer=3"),
    ({"n_layer": 1}, r"model.safetensors: unexpected tensors \['h.1.attn.c_attn.bias'"),
    ({"n_head": 4, "n_embd": 48}, r"tokens_embed.weight has shape \(\d+, 40\), but "
                                  r"config.json's n_embd=48 needs \(\d+, 48\)"),
])
def test_weights_that_do_not_match_config(hf_dir, tmp_path, fields, match):
    _, root = hf_dir
    shutil.copy(os.path.join(root, "model.safetensors"), tmp_path / "model.safetensors")
    hf = convert.read_hf_config(root)
    write_config(tmp_path, **{**{k: hf[k] for k in convert.SHAPE_FIELDS}, **fields})
    with pytest.raises(convert.ConversionError, match=match):
        convert.import_hf(str(tmp_path), str(tmp_path / "wd"))


def test_gpt2_weights_that_do_not_match_config(tmp_path):
    """The shared table gives the GPT-2 path the same one-line errors (was a KeyError)."""
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=30)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "n_inner": 32}))
    with pytest.raises(convert.ConversionError,
                       match=r"h.0.mlp.c_fc.weight has shape \(16, 64\), but config.json's "
                             r"n_inner=32 needs \(16, 32\)"):
        convert.import_hf(str(tmp_path), str(tmp_path / "wd"))


def test_bad_tokenizer_files(hf_dir, tmp_path):
    _, root = hf_dir
    for name in ("config.json", "model.safetensors", "vocab.json"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    lines = open(os.path.join(root, "merges.txt")).read().split("\n")
    (tmp_path / "merges.txt").write_text("\n".join(lines[:3] + ["t h e"] + lines[3:]))
    with pytest.raises(ValueError, match=r"merges.txt line 4: 't h e' is not two"):
        convert.import_hf(str(tmp_path), str(tmp_path / "wd"))


def test_weights_only_import_then_sampling_asks_for_a_tokenizer(hf_dir, tmp_path):
    _, root = hf_dir
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    cfg = convert.import_hf(str(tmp_path), str(tmp_path / "wd"))
    assert cfg.data.tokenizer != "gpt1"
    run = open_run(str(tmp_path / "wd"))
    with pytest.raises(WorkdirError, match="has no tokenizer .* sampling and evaluation need"):
        run.tokenizer  # noqa: B018


def test_fine_tune_imported_gpt1_and_resume(hf_dir, tmp_path):
    """`finetune --init_from=` an imported GPT-1 (scanned: one layer to compile) runs; a
    run that lost its last checkpoint resumes from the one before and ends the same."""
    from test_optim import experiment
    imported, workdir = str(tmp_path / "gpt1"), tmp_path / "ft"
    convert.import_hf(hf_dir[1], imported, scan_layers=True)
    rows = [{"text": f"{w} movie", "label": int(w == "good")} for w in ("good", "bad") * 8]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = experiment("finetune/jsonl", "classification")
    cfg.finetune.update(dict(train_jsonl=str(tmp_path / "train.jsonl"),
                             val_jsonl=str(tmp_path / "val.jsonl"), max_len=12, epochs=0))
    cfg.train.update(dict(steps=4, batch_size=8, log_every=1, eval_every=4, ckpt_every=2))
    saved = {k: getattr(jax.config, k) for k in CACHE_FLAGS}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # the rerun compiles the same step again: let it hit a persistent cache
        first = finetune.finetune(cfg, imported, str(workdir))
        shutil.rmtree(workdir / "checkpoints" / "4")  # as if killed after step 2's save
        again = finetune.finetune(cfg, imported, str(workdir))
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
    assert np.isfinite(first["loss"]) and 0.0 <= first["accuracy"] <= 1.0
    assert again["loss"] == first["loss"] and again["eval_loss"] == first["eval_loss"]
    with open(workdir / "metrics.jsonl") as f:
        steps = [row["step"] for row in map(json.loads, f) if "loss" in row]
    assert steps == [1, 2, 3, 4]  # the rerun started at step 3 and set 3, 4 aside first
    with open(workdir / "metrics.jsonl.after-2") as f:
        assert [row["step"] for row in map(json.loads, f) if "loss" in row] == [3, 4]
    pre, ft = Workdir(imported).read_config().model, Workdir(workdir).read_config().model
    assert ft.vocab_size == pre.vocab_size + 3 and ft.norm == "post"
    assert isinstance(Workdir(workdir).tokenizer(), tokenizer_lib.GPT1Tokenizer)
