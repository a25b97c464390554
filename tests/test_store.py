"""The token store: shards and their reader, checks of bad stores, mixtures, host slices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, stdlib_text_corpus

from gpt_jax import config, data
from gpt_jax import tokenizer as T
from gpt_jax.data import store

FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py")


def _cfg(tmp_path, **data_fields):
    cfg = config.base_config()
    cfg.model.vocab_size, cfg.model.context = 256, 16
    cfg.train.batch_size = 10
    cfg.data.update(data_dir=str(tmp_path / "data"), num_workers=1, tokenizer="char",
                    shard_tokens=1000)
    cfg.data.update(data_fields)
    return cfg


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    """The in-process store of six stdlib files, in shards of 1,000 tokens."""
    root = tmp_path_factory.mktemp("store")
    stdlib_text_corpus(root, FILES)
    cfg = _cfg(root, source="text", text_glob=str(root / "*.txt"), val_fraction=0.3)
    return cfg, data.prepare(cfg)


def test_windows_across_shards_match_the_flat_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60_000, n).astype(np.uint16) for n in (5, 700, 1, 1300, 44)]
    writer = store.ShardWriter(tmp_path, "src", "train", np.uint16, 500)
    for p in parts:
        writer.write(p)
    shards = writer.close()
    flat = np.concatenate(parts)
    assert [s["num_tokens"] for s in shards] == [500, 500, 500, 500, 50]
    assert [s["file"] for s in shards][-1] == "src/train-00004.bin"
    tokens = store.ShardedTokens(tmp_path, shards, np.uint16, 500)
    starts = np.array([0, 499, 10, 1234, len(flat) - 33])
    np.testing.assert_array_equal(tokens.windows(starts, 33),
                                  np.stack([flat[s:s + 33] for s in starts]))
    np.testing.assert_array_equal(np.asarray(tokens), flat)
    np.testing.assert_array_equal(tokens[990:1010], flat[990:1010])
    assert tokens[-1] == flat[-1] and len(tokens) == len(flat)
    ids = np.arange(0, (len(flat) - 1) // 16)
    np.testing.assert_array_equal(data.gather_windows(tokens, ids, 16),
                                  data.gather_windows(flat, ids, 16))


def test_store_batches_equal_the_flat_array(text_store):
    cfg, corpus = text_store
    assert len(corpus.manifests["train"]["shards"]) > 5  # many shards, windows cross them
    flat = np.asarray(corpus.train)
    for step in (0, 1, 57, 300):
        np.testing.assert_array_equal(
            corpus.batch(seed=3, step=step, global_batch=10, context=16),
            data.train_batch(flat, seed=3, step=step, global_batch=10, context=16))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_bad_stores_are_refused_naming_the_file(text_store, tmp_path):
    cfg, corpus = text_store
    shard = corpus.manifests["train"]["shards"][2]["file"]

    def refused(directory, *needles, **fields):
        bad = _cfg(tmp_path, store=directory, **fields)
        with pytest.raises(config.ConfigError) as e:
            data.prepare(bad)
        for needle in needles:
            assert needle in str(e.value), str(e.value)
        assert "\n" not in str(e.value)

    d = _copy(corpus.directory, tmp_path / "no_manifest")
    os.remove(os.path.join(d, "manifest.json"))
    refused(d, "data.store=", "manifest.json does not exist", "incomplete")
    d = _copy(corpus.directory, tmp_path / "short")
    os.truncate(os.path.join(d, shard), 100)
    refused(d, shard, "100 bytes, shorter than the 2000")
    d = _copy(corpus.directory, tmp_path / "missing")
    os.remove(os.path.join(d, shard))
    refused(d, shard, "missing")
    d = _copy(corpus.directory, tmp_path / "incomplete")
    manifest = json.loads(open(os.path.join(d, "manifest.json")).read())
    del manifest["sources"]["text"]["splits"]["val"]
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    refused(d, "has no 'val' split")
    # A tokenizer other than the store's.
    refused(corpus.directory, "data.tokenizer='sentencepiece'", "'char'",
            tokenizer="sentencepiece")
    other = T.build_char_tokenizer(["xyz"])
    other.save(tmp_path / "other")
    refused(corpus.directory, "data.tokenizer_path=", "fingerprint", tokenizer="file",
            tokenizer_path=str(tmp_path / "other" / other.file_name))


def test_in_process_store_is_rebuilt_when_incomplete(text_store, tmp_path):
    cfg, corpus = text_store
    cfg = _cfg(tmp_path, source="text", text_glob=cfg.data.text_glob, val_fraction=0.3)
    first = data.prepare(cfg)
    os.remove(os.path.join(first.directory, "manifest.json"))  # killed before the manifest
    again = data.prepare(cfg)
    np.testing.assert_array_equal(np.asarray(again.train), np.asarray(corpus.train))


def mixture_store(path, sizes, tok):
    """A store of len(sizes) sources; source i's tokens are all i (so rows show their source)."""
    entries = {}
    for i, n in enumerate(sizes):
        splits = {}
        for split in ("train", "val"):
            writer = store.ShardWriter(path, f"s{i}", split, np.uint16, 4096)
            writer.write(np.full(n, i, np.uint16))
            splits[split] = store.split_record(writer.close(), 10, n)
        entries[f"s{i}"] = {"description": {"source": "synthetic"}, "key": f"s{i}",
                            "splits": splits, "counts": {}}
    tok.save(path)
    store.write_manifest(path, store.make_manifest(tok, 4096, entries, {}))
    return str(path)


def test_mixture_draws_each_source_in_proportion(tmp_path):
    tok = T.build_char_tokenizer(["abc"])
    path = mixture_store(tmp_path / "mix", [3000, 2000, 1000], tok)
    cfg = _cfg(tmp_path, store=path)
    cfg.data.mixture = {"s0": 0.6, "s1": 0.3, "s2": 0.1}
    corpus = data.prepare(cfg)
    kw = dict(seed=1, global_batch=10, context=16)
    counts = np.zeros(3)
    for step in range(1000):
        rows = corpus.batch(step=step, **kw)
        assert (rows == rows[:, :1]).all()  # a row comes from one source
        per = np.bincount(rows[:, 0], minlength=3)
        assert (np.abs(per - np.array([6, 3, 1])) <= 1).all()
        counts += per
    np.testing.assert_allclose(counts / counts.sum(), [0.6, 0.3, 0.1], atol=0.01)
    # A pure function of (seed, step), and hosts' slices make up the global batch.
    np.testing.assert_array_equal(corpus.batch(step=500, **kw), corpus.batch(step=500, **kw))
    parts = [corpus.batch(step=77, process_index=p, process_count=2, **kw) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(parts), corpus.batch(step=77, **kw))
    # Each source's own windows do not repeat within its epoch.
    ids = np.concatenate([data.window_ids(2000 // 16, 1, int(s), 3, stream=1)
                          for s in range(0, 120, 3)])
    assert len(set(ids.tolist())) == len(ids)


@pytest.mark.parametrize("mixture,needle", [
    ({"s0": 0.5, "s1": 0.4}, "sums to 0.9, not 1"),
    ({"s0": 0.5, "s1": 0.3, "web": 0.2}, "data.mixture.web: no such source"),
    ({}, "data.mixture is empty"),
    ({"s0": 0.8, "s1": 0.1, "s2": 0.1}, None),
    ({"s0": 0.6, "s1": 0.3, "s2": 0.1}, None),
])
def test_mixture_weights_are_checked(tmp_path, mixture, needle):
    path = mixture_store(tmp_path / "mix", [3000, 2000, 1000], T.build_char_tokenizer(["a"]))
    cfg = _cfg(tmp_path, store=path)
    cfg.data.mixture = mixture
    if needle is None:
        assert data.prepare(cfg).weights == mixture
        cfg.train.batch_size = 1  # 1 row cannot hold three sources every step
        needle = "cannot hold every source's share"
    with pytest.raises(config.ConfigError, match=needle):
        data.prepare(cfg)


READ_ROWS = """
import json, sys
import numpy as np
from gpt_jax import config, data
cfg = config.base_config()
cfg.model.context, cfg.data.store, cfg.data.tokenizer = 16, sys.argv[1], "char"
corpus = data.prepare(cfg)
p, n = int(sys.argv[2]), int(sys.argv[3])
rows = [corpus.batch(seed=0, step=s, global_batch=8, context=16, process_index=p,
                     process_count=n).tolist() for s in range(30)]
print(json.dumps(rows))
"""


def test_two_processes_read_disjoint_rows(text_store):
    cfg, corpus = text_store

    procs = [subprocess.Popen([sys.executable, "-c", READ_ROWS, corpus.directory, str(p), "2"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO) for p in (0, 1)]
    a, b = (np.array(json.loads(proc.communicate(timeout=120)[0])) for proc in procs)
    assert a.shape == b.shape == (30, 4, 17)
    full = np.stack([corpus.batch(seed=0, step=s, global_batch=8, context=16)
                     for s in range(30)])
    np.testing.assert_array_equal(np.concatenate([a, b], axis=1), full)
    # Disjoint: process p holds rows [4p, 4p + 4) of each global batch, and the 240 windows of
    # these 30 steps are distinct positions of one epoch.
    ids = data.window_ids(data.num_windows(len(corpus.train), 16), 0, 0, 30 * 8)
    assert len(set(ids.tolist())) == 30 * 8


def test_prefetch_keeps_order_and_close_stops_reading():
    import threading
    import time

    started = []

    def batch(step):
        started.append(step)
        time.sleep(0.01)
        if step == 7:
            raise ValueError("step 7 failed")
        return step * 10

    it = data.prefetch(batch, 3, 7, depth=2)
    assert list(it) == [30, 40, 50, 60]  # in order, and it ends at `stop`
    it = data.prefetch(batch, 5, 100, depth=3)
    assert [next(it), next(it)] == [50, 60]
    with pytest.raises(ValueError, match="step 7 failed"):  # a batch's error, as raised
        next(it)
    it.close()
    count = len(started)
    time.sleep(0.05)
    assert len(started) == count and max(started) <= 10  # nothing read after close
    assert not [t for t in threading.enumerate() if t.name.startswith("gpt_jax-prefetch")]
