"""Data sources, token files + manifests, and the pure batch functions, on real data."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig

import numpy as np
import pytest
from conftest import stdlib_text_corpus

from gpt_jax import config, data
from gpt_jax import tokenizer as T

FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py",
         "colorsys.py", "contextlib.py", "glob.py", "keyword.py", "calendar.py", "queue.py")


def _cfg(tmp_path, **data_fields):
    cfg = config.base_config()
    cfg.model.vocab_size = 512
    cfg.model.context = 64
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.num_workers = 1
    cfg.data.update(data_fields)
    return cfg


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A dozen stdlib files copied into a tmp dir (a 'text' source)."""
    return stdlib_text_corpus(tmp_path_factory.mktemp("corpus"), FILES)


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    """The whole stdlib source with the char tokenizer (the default source)."""
    cfg = _cfg(tmp_path_factory.mktemp("stdlib"), source="stdlib", tokenizer="char",
               num_workers=2)
    return cfg, data.prepare(cfg)


def _read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------- splits/sources


def test_assign_splits_stable_and_non_empty():
    keys = [f"file{i}.py" for i in range(200)]
    splits = data.assign_splits(keys, 0.1)
    assert splits == data.assign_splits(list(keys), 0.1)
    assert 5 < splits.count("val") < 40
    # each key's split depends only on that key, not on which other keys exist
    assert data.assign_splits(keys[:100], 0.1) == splits[:100]
    tiny = data.assign_splits(keys[:3], 1e-9)
    assert tiny.count("val") == 1 and tiny.count("train") == 2
    assert data.assign_splits(keys[:3], 1 - 1e-9).count("train") == 1
    with pytest.raises(ValueError):
        data.assign_splits(keys[:1], 0.1)


def test_stdlib_source_splits_are_disjoint_and_stable():
    root = sysconfig.get_paths()["stdlib"]
    files = data.stdlib_files(root)
    assert len(files) > 500 and not any("site-packages" in f for f in files)
    assert all(f.endswith(".py") for f in files)
    a = data.stdlib_source(0.05, seed=0)
    b = data.stdlib_source(0.05, seed=1)
    assert a.key == b.key  # the seed only orders the tokenizer sample
    splits = data.assign_splits(files, 0.05)
    assert "val" in splits and "train" in splits
    val_first = next(f for f, s in zip(files, splits) if s == "val")
    assert next(a.docs("val")) == _read(os.path.join(root, val_first))


def test_stdlib_corpus_prepared(stdlib_corpus):
    cfg, corpus = stdlib_corpus
    tok = corpus.tokenizer
    for split in ("train", "val"):
        m = corpus.manifests[split]
        assert m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == tok.fingerprint
        assert m["num_tokens"] == len(corpus.tokens(split)) > 0
        assert m["num_docs"] > 0 and m["source"]["source"] == "stdlib"
        stored = json.loads(_read(os.path.join(corpus.directory, "manifest.json")))
        assert stored["sources"]["stdlib"]["splits"][split] == {
            k: m[k] for k in ("num_tokens", "num_docs", "num_bytes", "shards")}
        assert corpus.bytes_per_token(split) == m["num_bytes"] / m["num_tokens"]
    assert corpus.manifests["train"]["num_bytes"] > 10_000_000  # tens of MB
    assert corpus.manifests["val"]["num_docs"] < corpus.manifests["train"]["num_docs"]
    # The token file holds the documents in order, each followed by eot.
    train = np.asarray(corpus.train)
    first_eot = int(np.argmax(train == tok.eot_id))
    assert tok.decode(train[:first_eot]) == next(data.stdlib_source(0.05, 0).docs("train"))
    assert (train == tok.eot_id).sum() == corpus.manifests["train"]["num_docs"]
    assert T.load_tokenizer(corpus.directory).fingerprint == tok.fingerprint


def test_prepare_reuses_token_files(stdlib_corpus):
    cfg, corpus = stdlib_corpus
    bins = [os.path.join(corpus.directory, s["file"]) for split in ("train", "val")
            for s in corpus.manifests[split]["shards"]]
    mtimes = [os.stat(p).st_mtime_ns for p in bins]
    again = data.prepare(cfg)
    assert again.directory == corpus.directory
    assert [os.stat(p).st_mtime_ns for p in bins] == mtimes
    np.testing.assert_array_equal(again.val, corpus.val)


def test_sentencepiece_text_source_round_trips(tmp_path, text_dir):
    cfg = _cfg(tmp_path, source="text", text_glob=str(text_dir / "*.txt"),
               tokenizer="sentencepiece", tokenizer_train_chars=100_000, val_fraction=0.2)
    corpus = data.prepare(cfg)
    tok = corpus.tokenizer
    assert tok.vocab_size == 512
    source = data.make_source(cfg)
    for split in ("train", "val"):
        expected = "".join(doc + T.EOT for doc in source.docs(split))
        assert tok.decode(corpus.tokens(split)) == expected
        assert corpus.manifests[split]["num_bytes"] == len(expected.encode()) - len(
            T.EOT) * corpus.manifests[split]["num_docs"]
    model_file = T.tokenizer_file(cfg, source.key)
    mtime = os.stat(model_file).st_mtime_ns
    # Parallel tokenization writes the same files; the vocabulary is not retrained.
    cfg2 = _cfg(tmp_path, source="text", text_glob=str(text_dir / "*.txt"),
                tokenizer="sentencepiece", tokenizer_train_chars=100_000, val_fraction=0.2,
                num_workers=2, token_dir=str(tmp_path / "parallel"))
    parallel = data.prepare(cfg2)
    assert os.stat(model_file).st_mtime_ns == mtime
    np.testing.assert_array_equal(parallel.train, corpus.train)
    np.testing.assert_array_equal(parallel.val, corpus.val)


def test_half_written_split_is_rebuilt(tmp_path, text_dir):
    cfg = _cfg(tmp_path, source="text", text_glob=str(text_dir / "*.txt"), tokenizer="char")
    corpus = data.prepare(cfg)
    expected = np.array(corpus.val)
    val_bin = os.path.join(corpus.directory, corpus.manifests["val"]["shards"][0]["file"])
    with open(val_bin, "r+b") as f:  # a killed run's truncated shard, no manifest yet
        f.truncate(10)
    os.remove(os.path.join(corpus.directory, "manifest.json"))  # killed before the manifest
    again = data.prepare(cfg)
    np.testing.assert_array_equal(again.val, expected)
    np.testing.assert_array_equal(again.train, corpus.train)
    assert not [n for _, _, files in os.walk(corpus.directory) for n in files if ".tmp" in n]


def test_uint32_for_large_vocabularies(tmp_path):
    assert data.token_dtype(65535) == np.uint16 and data.token_dtype(65536) == np.uint32
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    (tmp_path / "a.txt").write_text("".join(chars), encoding="utf-8")
    (tmp_path / "b.txt").write_text("".join(reversed(chars)), encoding="utf-8")
    cfg = _cfg(tmp_path, source="text", text_glob=str(tmp_path / "*.txt"), tokenizer="char",
               val_fraction=0.5)
    cfg.model.vocab_size = 80_000
    cfg.model.context = 8
    corpus = data.prepare(cfg)
    assert corpus.tokenizer.vocab_size > 65535
    assert corpus.train.dtype == np.uint32 and corpus.manifests["val"]["dtype"] == "uint32"
    assert corpus.tokenizer.decode(corpus.train[:-1]) in ("".join(chars),
                                                          "".join(reversed(chars)))


# ---------------------------------------------------------------------------- guards


def test_guards_name_the_field(tmp_path, text_dir):
    glob = str(text_dir / "*.txt")
    cfg = _cfg(tmp_path, source="text", text_glob=glob, tokenizer="char")
    cfg.model.context = 10_000_000
    with pytest.raises(config.ConfigError, match=r"model.context=10000000 exceeds the \d+ "
                                                 "tokens of the validation split"):
        data.prepare(cfg)
    cfg = _cfg(tmp_path / "v", source="text", text_glob=glob, tokenizer="char")
    cfg.model.vocab_size = 20
    with pytest.raises(config.ConfigError, match="model.vocab_size=20"):
        data.prepare(cfg)
    with pytest.raises(config.ConfigError, match="data.text_glob"):
        data.prepare(_cfg(tmp_path, source="text", text_glob=str(tmp_path / "none*")))


def test_explicit_token_dir_with_other_tokenizer_is_an_error(tmp_path, text_dir):
    token_dir = str(tmp_path / "tokens")
    files = sorted(str(p) for p in text_dir.glob("*.txt"))
    first = _cfg(tmp_path, source="text", text_glob=str(text_dir / "*.txt"), tokenizer="char",
                 token_dir=token_dir)
    data.prepare(first)
    data.prepare(first)  # same tokenizer: reused
    (tmp_path / "other").mkdir()
    for p in files[:3]:
        shutil.copy(p, tmp_path / "other")
    (tmp_path / "other" / "x.txt").write_text("ÿ new chars ✓\n", encoding="utf-8")
    other = _cfg(tmp_path, source="text", text_glob=str(tmp_path / "other" / "*.txt"),
                 tokenizer="char", token_dir=token_dir)
    with pytest.raises(config.ConfigError, match="data.token_dir=.*tokenizer fingerprint"):
        data.prepare(other)


# ---------------------------------------------------------------------------- batches


def _tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint32)  # token value = its position


def test_train_batch_windows_and_purity():
    tokens, ctx = _tokens(50 * 16 + 1), 16
    b = data.train_batch(tokens, seed=3, step=7, global_batch=4, context=ctx)
    assert b.shape == (4, ctx + 1) and b.dtype == np.int32
    np.testing.assert_array_equal(b, data.train_batch(tokens, seed=3, step=7, global_batch=4,
                                                      context=ctx))
    assert (b[:, 0] % ctx == 0).all()
    np.testing.assert_array_equal(b - b[:, :1], np.tile(np.arange(ctx + 1), (4, 1)))
    other_seed = data.train_batch(tokens, seed=4, step=7, global_batch=4, context=ctx)
    assert not np.array_equal(b, other_seed)


def test_epochs_sample_without_replacement():
    ctx, n_windows, batch = 8, 50, 5  # 10 steps per epoch
    tokens = _tokens(n_windows * ctx + 1 + 3)  # a ragged tail that never forms a window
    starts = [data.train_batch(tokens, seed=0, step=s, global_batch=batch, context=ctx)[:, 0]
              for s in range(20)]
    epoch0, epoch1 = np.concatenate(starts[:10]), np.concatenate(starts[10:])
    assert sorted(epoch0 // ctx) == list(range(n_windows))
    assert sorted(epoch1 // ctx) == list(range(n_windows))
    assert not np.array_equal(epoch0, epoch1)
    # a batch straddling an epoch boundary (7 rows, 50 windows)
    ids = np.concatenate([data.window_ids(n_windows, 0, s * 7, 7) for s in range(15)])
    assert sorted(ids[:50]) == list(range(50)) and sorted(ids[50:100]) == list(range(50))


def test_multi_host_slices_concatenate_to_the_global_batch():
    tokens, ctx = _tokens(1000), 10
    full = data.train_batch(tokens, seed=1, step=12, global_batch=8, context=ctx)
    parts = [data.train_batch(tokens, seed=1, step=12, global_batch=8, context=ctx,
                              process_index=p, process_count=4) for p in range(4)]
    assert all(p.shape == (2, ctx + 1) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full)
    with pytest.raises(ValueError):
        data.train_batch(tokens, seed=1, step=0, global_batch=6, context=ctx, process_count=4)


def test_resume_sees_the_same_batches():
    tokens, ctx = _tokens(37 * 12 + 5), 12
    kwargs = dict(seed=9, global_batch=6, context=ctx)
    loop = [data.train_batch(tokens, step=s, **kwargs) for s in range(20)]
    data.epoch_permutation.cache_clear()
    resumed = [data.train_batch(tokens, step=s, **kwargs) for s in range(10, 20)]
    for a, b in zip(loop[10:], resumed):
        np.testing.assert_array_equal(a, b)


def test_train_batch_on_a_memmap(stdlib_corpus):
    cfg, corpus = stdlib_corpus
    b = data.train_batch(corpus.train, seed=0, step=3, global_batch=4, context=128)
    assert b.shape == (4, 129) and b.max() < corpus.tokenizer.vocab_size


def test_eval_batches():
    tokens, ctx = _tokens(100 * 4 + 1), 4  # 100 windows
    batches = list(data.eval_batches(tokens, global_batch=5, context=ctx, num_batches=4))
    assert len(batches) == 4 and all(b.shape == (5, ctx + 1) for b in batches)
    starts = np.concatenate([b[:, 0] for b in batches]) // ctx
    np.testing.assert_array_equal(starts, np.arange(20) * 5)  # spread over the split
    again = list(data.eval_batches(tokens, global_batch=5, context=ctx, num_batches=4))
    np.testing.assert_array_equal(np.stack(batches), np.stack(again))
    hosts = [list(data.eval_batches(tokens, global_batch=4, context=ctx, num_batches=2,
                                    process_index=p, process_count=2)) for p in range(2)]
    single = list(data.eval_batches(tokens, global_batch=4, context=ctx, num_batches=2))
    for i in range(2):
        np.testing.assert_array_equal(np.concatenate([hosts[0][i], hosts[1][i]]), single[i])
    wrapped = list(data.eval_batches(_tokens(3 * 4 + 1), global_batch=4, context=4,
                                     num_batches=2))
    assert (np.concatenate([b[:, 0] for b in wrapped]) // 4).tolist() == [0, 1, 2] * 2 + [0, 1]


# ---------------------------------------------------------------------------- TFDS


def test_tfds_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    common = dict(source="tfds", tfds_name="lm1b", tfds_split="train", tokenizer="char",
                  tfds_data_dir=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        cfg = _cfg(tmp_path, tfds_val_split="test", tfds_max_docs=30, **common)
        cfg.model.context = 16
        corpus = data.prepare(cfg)
        assert corpus.manifests["train"]["num_docs"] == 30
        assert corpus.manifests["val"]["num_docs"] == 30
        assert corpus.manifests["train"]["source"]["name"] == "lm1b"
        first = next(data.make_source(cfg).docs("train"))
        assert corpus.tokenizer.decode(corpus.train[:len(first)]) == first

        hashed = _cfg(tmp_path, tfds_val_split="", val_fraction=0.3, **common)
        hashed.model.context = 4
        split = data.prepare(hashed)
        docs = [split.manifests[s]["num_docs"] for s in ("train", "val")]
        assert sum(docs) == 40 and min(docs) > 0
