"""GPT-2 byte-level BPE: identical ids to transformers' GPT2Tokenizer on the same files."""

from __future__ import annotations

import os
import pickle
import sysconfig

import pytest

from gpt_jax import config
from gpt_jax import tokenizer as T

FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py")
SAMPLES = [
    "def f(x):\n\treturn x  +  1\n",
    "Hello world! It's a test; we'll see, they've gone, I'm here, you'd know, she's OK.",
    "emoji 😀🚀👩‍👩‍👧 and CJK 日本語テキスト 한국어, accents é ü ß Ωμέγα",
    "  leading, trailing  \n\n\n   \t\t mixed\r\nwindows line\r\n   ",
    "digits 1234567890 and 3.14159e-10 ١٢٣",
    "",
    " ",
    "\x00\x01 control \x7f \u200b zero-width",
    "'S 'LL ''quoted'' don't WON'T",
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> str:
    """vocab.json + merges.txt of a ~500-entry byte-level BPE trained on stdlib files."""
    pytest.importorskip("regex", reason="GPT-2's pre-tokenization regex needs `regex`")
    tokenizers = pytest.importorskip("tokenizers", reason="the `tokenizers` package (hf extra)")
    root = sysconfig.get_paths()["stdlib"]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train([os.path.join(root, n) for n in FILES], vocab_size=500, min_frequency=2,
              special_tokens=[T.EOT], show_progress=False)
    out = str(tmp_path_factory.mktemp("gpt2tok"))
    bpe.save_model(out)
    return out


@pytest.fixture(scope="module")
def tok(vocab_dir) -> T.GPT2Tokenizer:
    return T.load_tokenizer(vocab_dir)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_matches_transformers(tok, vocab_dir, text):
    transformers = pytest.importorskip("transformers", reason="transformers (hf extra)")
    ref = transformers.GPT2Tokenizer(os.path.join(vocab_dir, T.GPT2_VOCAB_FILE),
                                     os.path.join(vocab_dir, T.GPT2_MERGES_FILE))
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids


def test_eot_vocab_save_load_pickle(tok, vocab_dir, tmp_path):
    assert isinstance(tok, T.GPT2Tokenizer) and tok.kind == "gpt2"
    assert tok.vocab_size == 500 and tok.eot_id == tok.encoder[T.EOT]
    literal = tok.encode("a <|endoftext|> b")
    assert tok.eot_id not in literal and tok.decode(literal) == "a <|endoftext|> b"
    assert tok.decode([*tok.encode("x"), tok.eot_id]) == "x" + T.EOT
    path = tok.save(str(tmp_path))
    assert path.endswith(T.GPT2_VOCAB_FILE)
    assert os.path.exists(tmp_path / T.GPT2_MERGES_FILE)
    for again in (T.load_tokenizer(str(tmp_path)), T.load_tokenizer(path),
                  pickle.loads(pickle.dumps(tok))):
        assert again.fingerprint == tok.fingerprint
        assert again.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


def test_from_config(vocab_dir, tmp_path):
    cfg = config.base_config()
    cfg.data.tokenizer, cfg.data.tokenizer_path = "gpt2", vocab_dir
    cfg.model.vocab_size = 512
    config.validate(cfg)
    tok = T.from_config(cfg, "unused", lambda n: iter(()))
    assert tok.kind == "gpt2" and tok.vocab_size == 500
    cfg.data.tokenizer_path = str(tmp_path)
    with pytest.raises(config.ConfigError, match="data.tokenizer_path"):
        T.from_config(cfg, "unused", lambda n: iter(()))
    cfg.data.tokenizer_path = ""
    with pytest.raises(config.ConfigError, match="data.tokenizer_path"):
        config.validate(cfg)
