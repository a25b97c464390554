"""GPT-1's BPE: the same ids and decoded text as transformers' OpenAIGPTTokenizer."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sysconfig

import pytest

from gpt_jax import config
from gpt_jax import tokenizer as T

tokenizers = pytest.importorskip("tokenizers", reason="the `tokenizers` package (hf extra)")
pytest.importorskip("regex", reason="the pre-tokenization pattern needs `regex`")

FILES = ("textwrap.py", "string.py", "shlex.py")
WORDS = ("the self return def String import class if else print value don't can't "
         "it's 3.14 1,000 (x) a,b e-mail U.S.A. naïve CAFÉ Straße ΟΔΟΣ İstanbul").split()
ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      \t\n\r"
            ".,;:!?'\"()[]{}-_$%&*+=<>/\\|`~^@#…–—“”‘’¿¡«»§°±"
            "éÉüÜßñçøåΣσςΩμλ日本語中文한국어😀🚀\u200b\u00ad\x00\x07\x7f\ufffd\u00a0\u2028\u3000ﬁİ"
            "e\u0301a\u0308")


def texts(n: int, seed: int = 0) -> list[str]:
    """`n` strings: word salads (mixed case, digits, contractions) and random characters."""
    rng = random.Random(seed)
    out = ["", " ", "\n\n", "Hello, World! Don't panic.", "x = [1, 2]  # comment",
           "ΟΔΟΣ ΣΑΣ σας", "naïve café — “quoted” ‘text’…", "日本語のテキスト", "emoji 😀🚀 end"]
    while len(out) < n:
        if rng.random() < 0.5:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 60))))
        else:
            words = [rng.choice(WORDS) for _ in range(rng.randrange(1, 12))]
            out.append(" ".join(w.upper() if rng.random() < 0.2 else w for w in words))
    return out


def train_gpt1_bpe(directory: str, vocab_size: int = 400) -> str:
    """A GPT-1-style vocab.json + merges.txt ('</w>' word ends, lowercased, '<unk>') trained
    on stdlib files, plus GPT-1's newline piece '\\n</w>'."""
    root = sysconfig.get_paths()["stdlib"]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=T.GPT1_UNK,
                                                     end_of_word_suffix=T.GPT1_EOW))
    bpe.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[T.GPT1_UNK],
        end_of_word_suffix=T.GPT1_EOW, show_progress=False)
    bpe.train([os.path.join(root, n) for n in FILES], trainer)
    os.makedirs(directory, exist_ok=True)
    bpe.model.save(directory)
    path = os.path.join(directory, T.GPT2_VOCAB_FILE)
    with open(path) as f:
        vocab = json.load(f)
    vocab[T.GPT1Tokenizer.EOT_PIECE] = len(vocab)
    with open(path, "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    return directory


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> str:
    return train_gpt1_bpe(str(tmp_path_factory.mktemp("gpt1tok")))


@pytest.fixture(scope="module")
def tok(vocab_dir) -> T.GPT1Tokenizer:
    return T.GPT1Tokenizer.from_directory(vocab_dir)


def test_matches_transformers(tok, vocab_dir):
    transformers = pytest.importorskip("transformers", reason="transformers (hf extra)")
    ref = transformers.OpenAIGPTTokenizer.from_pretrained(vocab_dir)
    tok = T.GPT1Tokenizer(tok._vocab_bytes, tok._merges_bytes, use_ftfy=False)  # as ref
    samples = texts(300)
    mismatches = [(s, tok.encode(s), ref.encode(s)) for s in samples
                  if tok.encode(s) != ref.encode(s)]
    assert not mismatches, mismatches[:3]
    decoded = [(s, tok.decode(tok.encode(s)), ref.decode(ref.encode(s))) for s in samples]
    assert all(a == b for _, a, b in decoded), [d for d in decoded if d[1] != d[2]][:3]
    assert tok.encode("Don't, CAFÉ!") == ref.encode("don ' t , cafe !")
    assert tok.decode(tok.encode("Don't, CAFÉ!")) == "don ' t , cafe !"
    assert tok.unk_id in tok.encode("😀") and tok.decode(tok.encode("a 😀b")) == "a <unk>b"


def test_kind_eot_save_load_pickle(tok, vocab_dir, tmp_path):
    assert tok.kind == "gpt1" and isinstance(T.load_tokenizer(vocab_dir), T.GPT1Tokenizer)
    assert tok.eot_id == tok.encoder["\n</w>"] and tok.vocab_size == len(tok.encoder)
    ids = tok.encode("a\n\nb <|endoftext|> \n")
    assert tok.eot_id not in ids
    assert tok.decode([*tok.encode("the end"), tok.eot_id, *tok.encode("next")]) == (
        "the end" + T.EOT + "next")
    path = tok.save(str(tmp_path))
    assert path.endswith(T.GPT2_VOCAB_FILE) and (tmp_path / T.GPT2_MERGES_FILE).exists()
    for again in (T.load_tokenizer(str(tmp_path)), T.load_tokenizer(path),
                  pickle.loads(pickle.dumps(tok))):
        assert isinstance(again, T.GPT1Tokenizer) and again.fingerprint == tok.fingerprint
        assert again.encode(texts(12)[-1]) == tok.encode(texts(12)[-1])
    assert T.GPT1Tokenizer(tok._vocab_bytes, tok._merges_bytes, use_ftfy=True).fingerprint != (
        T.GPT1Tokenizer(tok._vocab_bytes, tok._merges_bytes, use_ftfy=False).fingerprint)


def test_without_unk_or_newline_piece(tok):
    vocab = {p: i for p, i in tok.encoder.items() if p not in (T.GPT1_UNK, "\n</w>")}
    vocab = {p: i for i, p in enumerate(sorted(vocab, key=vocab.get))}
    bare = T.GPT1Tokenizer(json.dumps(vocab).encode(), tok._merges_bytes, use_ftfy=False)
    assert bare.unk_id is None and bare.eot_id == len(vocab) == bare.vocab_size - 1
    # Characters the vocabulary lacks are dropped; the rest of the word is still merged.
    assert bare.decode(bare.encode("sel😀f 😀")) == tok.decode(tok.encode("self"))


def test_from_config_and_bad_files(vocab_dir, tmp_path):
    cfg = config.base_config()
    cfg.data.tokenizer, cfg.data.tokenizer_path = "gpt1", vocab_dir
    cfg.model.vocab_size = 401
    tok = T.from_config(config.validate(cfg), "unused", lambda n: iter(()))
    assert tok.kind == "gpt1" and tok.vocab_size == 401
    cfg.data.tokenizer_path = ""
    with pytest.raises(config.ConfigError, match="data.tokenizer_path"):
        config.validate(cfg)
    with open(os.path.join(vocab_dir, T.GPT2_MERGES_FILE)) as f:
        lines = f.read().split("\n")
    shutil.copy(os.path.join(vocab_dir, T.GPT2_VOCAB_FILE), tmp_path / T.GPT2_VOCAB_FILE)
    (tmp_path / T.GPT2_MERGES_FILE).write_text("\n".join(lines[:5] + ["a b c"] + lines[5:]))
    with pytest.raises(ValueError, match=r"merges.txt line 6: 'a b c' is not two"):
        T.load_tokenizer(str(tmp_path))
    (tmp_path / T.GPT2_VOCAB_FILE).write_text('["not", "a", "dict"]')
    with pytest.raises(ValueError, match="vocab.json: not a JSON object"):
        T.load_tokenizer(str(tmp_path))


def test_ftfy_when_installed(tok):
    pytest.importorskip("ftfy", reason="ftfy not installed: GPT1Tokenizer skips fix_text")
    fixed = T.GPT1Tokenizer(tok._vocab_bytes, tok._merges_bytes, use_ftfy=True)
    assert fixed.normalize("cafÃ© â€œquotedâ€\x9d &amp; don’t ﬁne") == (
        "cafe \"quoted\" & don't fine")
    assert fixed.encode("cafÃ©") == fixed.encode("café") != T.GPT1Tokenizer(
        tok._vocab_bytes, tok._merges_bytes, use_ftfy=False).encode("cafÃ©")


def test_sampled_continuation_keeps_the_word_break(tok):
    """GPT-1's pieces carry the space at the end of a word: the sampler decodes the new
    tokens together with the prompt, so they are not glued to the prompt's last word."""
    from gpt_jax.sample import continuation
    prompt, new = tok.encode("the value"), tok.encode("return self")
    assert tok.decode(prompt + new) == "the value return self"
    assert tok.decode(new) == "return self"  # on its own: no leading space
    assert continuation(tok, prompt, new) == " return self"
