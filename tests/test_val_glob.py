"""The 'text' source's validation split: independent of how the glob spells the path, or
named by `data.val_glob`."""

from __future__ import annotations

import os

import pytest
from conftest import tiny_config

from gpt_jax import data
from gpt_jax.config import ConfigError, validate
from gpt_jax.data import sources


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """40 files under tmp/corpus (two levels), 3 under tmp/held; cwd = tmp."""
    for i in range(40):
        sub = tmp_path / "corpus" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i}.txt").write_text(f"document {i}\n")
    (tmp_path / "held").mkdir()
    for i in range(3):
        (tmp_path / "held" / f"val{i}.txt").write_text(f"held out {i}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_glob_root():
    assert data.glob_root("text/*.txt") == "text"
    assert data.glob_root("/abs/path/text/**/*.txt") == "/abs/path/text"
    assert data.glob_root("*.txt") == "."
    assert data.glob_root("/*.txt") == "/"
    assert data.glob_root("a/b[0-9]/c.txt") == "a"


def test_hash_split_does_not_depend_on_the_spelling(corpus):
    spellings = ["corpus/**/*.txt", str(corpus / "corpus" / "**" / "*.txt"),
                 "./corpus/**/*.txt", "corpus/../corpus/**/*.txt"]
    splits = []
    for pattern in spellings:
        source = data.text_source(pattern, val_fraction=0.25, seed=0)
        splits.append({s: sorted(source.docs(s)) for s in data.SPLITS})
    assert all(s == splits[0] for s in splits[1:])
    assert 0 < len(splits[0]["val"]) < 40 and len(splits[0]["train"]) + len(
        splits[0]["val"]) == 40
    # relative to the root: the same split as hashing 'a/docN.txt' directly
    rel = sorted(os.path.relpath(p, "corpus") for p in sources._glob_files("corpus/**/*.txt"))
    want = [f"document {r.split('doc')[1][:-4]}\n"
            for r, s in zip(rel, data.assign_splits(rel, 0.25)) if s == "val"]
    assert splits[0]["val"] == sorted(want)


def test_val_glob_names_the_validation_files(corpus):
    source = data.text_source("corpus/**/*.txt", 0.25, 0, val_pattern="held/*.txt")
    assert sorted(source.docs("val")) == [f"held out {i}\n" for i in range(3)]
    assert len(list(source.docs("train"))) == 40  # no hash split: every training file
    assert source.description["val_glob"] == "held/*.txt"
    cfg = tiny_config()
    cfg.data.update(dict(source="text", text_glob="corpus/**/*.txt", val_glob="held/*.txt"))
    assert data.make_source(cfg).description == source.description


@pytest.mark.parametrize("val_glob,message", [
    ("nothing/*.txt", "data.val_glob='nothing/*.txt' matches no files"),
    ("corpus/a/doc1.txt", "data.val_glob='corpus/a/doc1.txt' and data.text_glob="
                          "'corpus/**/*.txt' both match 1 files"),
])
def test_val_glob_errors(corpus, val_glob, message):
    with pytest.raises(ConfigError) as err:
        data.text_source("corpus/**/*.txt", 0.25, 0, val_pattern=val_glob)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_val_glob_only_for_text():
    cfg = tiny_config()
    cfg.data.val_glob = "held/*.txt"
    with pytest.raises(ConfigError, match="data.val_glob='held/\\*.txt' applies only to "
                                          "data.source='text'"):
        validate(cfg)
