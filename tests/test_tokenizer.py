"""Tokenizers trained and used for real on standard-library text (small vocabularies)."""

from __future__ import annotations

import os
import pickle
import sysconfig

import pytest

from gpt_jax import config
from gpt_jax import tokenizer as T

FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py",
         "colorsys.py", "contextlib.py", "glob.py", "keyword.py")
VOCAB = 400
SAMPLES = [
    "def f(x):\n\treturn x  +  1\n",
    "emoji 😀🚀 and CJK 日本語テキスト 한국어",
    "  leading, trailing  \n\n\n   \t\t mixed\r\nwindows line\r\n",
    "digits 1234567890 and 3.14159e-10",
    "",
    " ",
    "\x00\x01 control \x7f and é ü ß",
    "literal <|endoftext|> stays text",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for name in FILES:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            out.append(f.read())
    return out


@pytest.fixture(scope="module")
def sp_tok(docs) -> T.SentencePieceTokenizer:
    return T.train_sentencepiece(docs, VOCAB)


def _cfg(tmp_path, tokenizer: str, vocab_size: int = VOCAB):
    cfg = config.base_config()
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.tokenizer = tokenizer
    cfg.model.vocab_size = vocab_size
    return cfg


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_round_trips_any_utf8(sp_tok, text):
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == text
    assert sp_tok.eot_id not in ids
    assert all(0 <= i < sp_tok.vocab_size for i in ids)


def test_sentencepiece_vocab_eot_and_digits(sp_tok):
    assert sp_tok.vocab_size == VOCAB
    assert sp_tok.kind == "sentencepiece"
    assert 0 <= sp_tok.eot_id < VOCAB
    # eot renders as the literal marker; encoding that literal never yields eot.
    ids = sp_tok.encode("a") + [sp_tok.eot_id] + sp_tok.encode("b")
    assert sp_tok.decode(ids) == "a<|endoftext|>b"
    assert sp_tok.eot_id not in sp_tok.encode(T.EOT)
    for i in sp_tok.encode("x = 1234567890 + 42"):
        assert sum(c.isdigit() for c in sp_tok.decode([i])) <= 1
    # Code-shaped pieces were learned: indentation compresses below one token per char.
    text = "        return self\n"
    assert len(sp_tok.encode(text)) < len(text) / 2


def test_sentencepiece_training_is_deterministic(docs, sp_tok):
    again = T.train_sentencepiece(docs, VOCAB)
    assert again.serialize() == sp_tok.serialize()
    assert again.fingerprint == sp_tok.fingerprint
    other = T.train_sentencepiece(docs[:-1], VOCAB)
    assert other.fingerprint != sp_tok.fingerprint


def test_save_load_and_pickle(tmp_path, sp_tok):
    path = sp_tok.save(str(tmp_path))
    assert path.endswith(T.MODEL_FILE)
    for loaded in (T.load_tokenizer(str(tmp_path)), T.load_tokenizer(path),
                   pickle.loads(pickle.dumps(sp_tok))):
        assert loaded.fingerprint == sp_tok.fingerprint
        assert loaded.encode(SAMPLES[1]) == sp_tok.encode(SAMPLES[1])
        assert loaded.eot_id == sp_tok.eot_id
    with pytest.raises(FileNotFoundError):
        T.load_tokenizer(str(tmp_path / "missing"))


def test_char_tokenizer_round_trip_and_unknown(tmp_path, docs):
    tok = T.build_char_tokenizer(docs)
    assert list(tok.chars) == sorted(set("".join(docs)))
    assert (tok.eot_id, tok.unk_id, tok.vocab_size) == (len(tok.chars), len(tok.chars) + 1,
                                                        len(tok.chars) + 2)
    text = docs[0][:500]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("ab") == [tok.chars.index("a"), tok.chars.index("b")]
    assert tok.encode("a😀") == [tok.chars.index("a"), tok.unk_id]
    assert tok.decode([tok.unk_id, tok.eot_id]) == "\ufffd" + T.EOT
    loaded = T.load_tokenizer(tok.save(str(tmp_path)))
    assert loaded.fingerprint == tok.fingerprint and loaded.encode(text) == tok.encode(text)
    assert pickle.loads(pickle.dumps(tok)).fingerprint == tok.fingerprint


def test_char_tokenizer_astral_and_empty():
    tok = T.CharTokenizer("😀a日")
    assert tok.decode(tok.encode("日😀a")) == "日😀a"
    assert T.load_tokenizer_bytes(tok.serialize(), T.CHAR_FILE).chars == tok.chars
    empty = T.CharTokenizer("")
    assert empty.encode("xy") == [empty.unk_id] * 2


def test_take_chars_and_training_sentences(docs):
    sample = T.take_chars(docs, 1000)
    assert sum(map(len, sample)) == 1000 and "".join(sample) == docs[0][:1000]
    assert T.take_chars(["ab", "cd"], 3) == ["ab", "c"]
    sentences = list(T.training_sentences(docs + ["x" * 5000 + "\n"]))
    assert "".join(sentences) == "".join(docs) + "x" * 5000 + "\n"
    assert max(map(len, sentences)) <= T.SENTENCE_CHARS


def test_from_config_trains_once_then_reuses(tmp_path, docs, sp_tok):
    cfg = _cfg(tmp_path, "sentencepiece")
    calls = []

    def train_docs(max_chars):
        calls.append(max_chars)
        return iter(docs)

    tok = T.from_config(cfg, "corpus", train_docs)
    path = T.tokenizer_file(cfg, "corpus")
    assert calls == [cfg.data.tokenizer_train_chars] and os.path.exists(path)
    assert tok.fingerprint == sp_tok.fingerprint  # same docs and vocab: same model
    mtime = os.stat(path).st_mtime_ns
    again = T.from_config(cfg, "corpus", train_docs)
    assert len(calls) == 1 and os.stat(path).st_mtime_ns == mtime
    assert again.fingerprint == tok.fingerprint


def test_from_config_train_chars_limit(tmp_path, docs):
    cfg = _cfg(tmp_path, "sentencepiece")
    cfg.data.tokenizer_train_chars = 20_000
    small = T.from_config(cfg, "corpus", lambda n: iter(docs))
    assert small.fingerprint == T.train_sentencepiece(T.take_chars(docs, 20_000),
                                                      VOCAB).fingerprint


def test_from_config_char_and_vocab_guard(tmp_path, docs):
    tok = T.from_config(_cfg(tmp_path, "char"), "corpus", lambda n: iter(docs))
    assert isinstance(tok, T.CharTokenizer)
    with pytest.raises(config.ConfigError, match="model.vocab_size=10 "):
        T.from_config(_cfg(tmp_path / "b", "char", vocab_size=10), "corpus",
                      lambda n: iter(docs))


def test_from_config_file(tmp_path, sp_tok):
    path = sp_tok.save(str(tmp_path / "tok"))
    cfg = _cfg(tmp_path, "file")
    cfg.data.tokenizer_path = path
    assert T.from_config(cfg, "unused", lambda n: iter(())).fingerprint == sp_tok.fingerprint
    cfg.model.vocab_size = VOCAB - 1
    with pytest.raises(config.ConfigError, match="model.vocab_size"):
        T.from_config(cfg, "unused", lambda n: iter(()))
    cfg.data.tokenizer_path = str(tmp_path / "nope.model")
    with pytest.raises(config.ConfigError, match="data.tokenizer_path"):
        T.from_config(cfg, "unused", lambda n: iter(()))
