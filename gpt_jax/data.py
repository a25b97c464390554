"""Documents -> token files + manifests -> batches as a pure function of (seed, step, host).

Sources (`data.source`):
- 'stdlib': the `.py` files of the running interpreter's standard library
  (`sysconfig.get_paths()['stdlib']`), `site-packages`/`dist-packages` skipped, test
  directories kept (about 1800 files, ~34 MB on CPython 3.11; without the tests it would be a
  third of that). Files that are not valid UTF-8 (a few deliberate encoding tests) are skipped.
- 'text': local files matched by `data.text_glob` (recursive `**` allowed), read as UTF-8.
- 'tfds': a TFDS text dataset (`data.tfds_*`); with `data.tfds_val_split=''` the validation
  documents are drawn from the training split by a hash of the document index.

File sources are split into train/validation by a stable hash (sha1) of each file's path
relative to its root (the stdlib for 'stdlib'; for 'text' the glob's leading directories, so
`text/*.txt` and `/abs/path/text/*.txt` split alike) against `data.val_fraction`; both splits
are guaranteed non-empty. With `data.val_glob` the 'text' validation files are named instead
(the hash split is off): they must match something and none may also match `text_glob`.

Each split is tokenized once (in `data.num_workers` processes), every non-empty document
followed by the end-of-text id, into `<data_dir>/tokens/<source>-<key>-<tokenizer>/` as
`train.bin`/`val.bin` (flat uint16, or uint32 when the vocabulary exceeds 65535 ids), a JSON
manifest per split (`train.json`, `val.json`; see `_manifest`) and a copy of the tokenizer.
Binary first, manifest last, both via temp file + os.replace: a split counts as built only when
its manifest exists and matches, so an interrupted run is rebuilt, never half-read. A directory
given explicitly by `data.token_dir` is checked instead: a manifest with
another tokenizer fingerprint or vocabulary there is an error, not a rebuild.

Batches: windows of `context + 1` tokens starting at multiples of `context`; an epoch is a
permutation of all windows seeded by (seed, epoch), and step s takes positions
[s*B, (s+1)*B) of the epochs laid end to end, so batches depend on (seed, step) only.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.config import ConfigError
from gpt_jax.tokenizer import Tokenizer
from gpt_jax.workdir import atomic_write_bytes, file_sha256

SPLITS = ("train", "val")
SPLIT_NAMES = {"train": "training", "val": "validation"}
MANIFEST_VERSION = 1
CHUNK_CHARS = 1 << 20  # documents are sent to tokenizer workers in chunks of about 1M chars
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


# ---------------------------------------------------------------------------- splits


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for `key` (sha1), independent of Python's hash seed."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) / float(1 << 160)


def assign_splits(keys: Sequence[str], val_fraction: float) -> list[str]:
    """'val' for keys whose hash fraction is below `val_fraction`, else 'train'.

    If that leaves a split empty, the key with the smallest (for 'val') or largest (for
    'train') hash moves over, so both splits are non-empty whenever there are 2+ keys.
    """
    if len(keys) < 2:
        raise ValueError(f"need at least 2 documents to make a train and a validation split, "
                         f"got {len(keys)}")
    fractions = [hash_fraction(k) for k in keys]
    splits = ["val" if f < val_fraction else "train" for f in fractions]
    if "val" not in splits:
        splits[int(np.argmin(fractions))] = "val"
    if "train" not in splits:
        splits[int(np.argmax(fractions))] = "train"
    return splits


# ---------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the documents come from.

    `description` is JSON-able and identifies the corpus (it keys the cache directories);
    `docs(split)` yields the split's documents in a fixed order; `sample(max_chars)` yields
    training documents in a seeded order for tokenizer training (0: all of them).
    """

    description: dict[str, Any]
    docs: Callable[[str], Iterator[str]]
    sample: Callable[[int], Iterator[str]]
    # files of each split that `docs` skipped (not UTF-8), filled in as it reads
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        """Short stable name: '<source>-<sha1 of the description>'."""
        blob = json.dumps(self.description, sort_keys=True).encode()
        return f"{self.description['source']}-{hashlib.sha1(blob).hexdigest()[:10]}"


def read_text(path: str) -> str | None:
    """The file's text as UTF-8, or None if it is not valid UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_files(root: str) -> list[str]:
    """Sorted paths (relative to `root`) of the `.py` files of a stdlib tree, no site-packages."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _files_digest(root: str, rel_paths: Sequence[str]) -> str:
    """sha1 over (path, size, mtime) of the files, so edited corpora get new cache keys."""
    h = hashlib.sha1()
    for rel in rel_paths:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_source(description: dict[str, Any], root: str, rel_paths: Sequence[str],
                val_fraction: float, seed: int, val_paths: Sequence[str] | None = None
                ) -> Source:
    """A source of text files split by the hash of their relative path, or with `val_paths`
    (some of `rel_paths`) as the validation split."""
    paths = sorted(rel_paths)
    if val_paths is None:
        splits = assign_splits(paths, val_fraction)
    else:
        named = set(val_paths)
        splits = ["val" if p in named else "train" for p in paths]
    by_split = {s: [p for p, sp in zip(paths, splits) if sp == s] for s in SPLITS}
    description = dict(description, files=len(paths), digest=_files_digest(root, paths))
    if val_paths is None:
        description["val_fraction"] = val_fraction

    skipped: dict[str, list[str]] = {}

    def docs_of(rels: Iterable[str], split: str | None = None) -> Iterator[str]:
        bad = []
        for rel in rels:
            text = read_text(os.path.join(root, rel))
            if text is None:
                bad.append(os.path.join(root, rel))
            else:
                yield text
        if split is not None:
            skipped[split] = bad
            if bad:
                print(f"warning: skipped {len(bad)} of {len(by_split[split])} files of the "
                      f"{SPLIT_NAMES[split]} split that are not UTF-8 text, e.g. "
                      f"{', '.join(bad[:3])}", file=sys.stderr)

    def sample(max_chars: int) -> Iterator[str]:
        train = by_split["train"]
        order = np.random.default_rng(seed).permutation(len(train)) if max_chars else None
        rels = train if order is None else [train[i] for i in order]
        return docs_of(rels)

    return Source(description, lambda split: docs_of(by_split[split], split), sample, skipped)


def stdlib_source(val_fraction: float, seed: int) -> Source:
    """The running interpreter's standard library `.py` sources."""
    root = sysconfig.get_paths()["stdlib"]
    desc = {"source": "stdlib", "root": root, "python": list(sys.version_info[:3])}
    return file_source(desc, root, stdlib_files(root), val_fraction, seed)


def glob_root(pattern: str) -> str:
    """The leading directories of `pattern` before any wildcard ('.' if none)."""
    parts = pattern.split(os.sep)[:-1]
    fixed = list(itertools.takewhile(lambda part: not re.search(r"[*?\[]", part), parts))
    return os.sep.join(fixed) or (os.sep if pattern.startswith(os.sep) else ".")


def _glob_files(pattern: str) -> list[str]:
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def text_source(pattern: str, val_fraction: float, seed: int, val_pattern: str = "") -> Source:
    """Local UTF-8 text files matched by `pattern` (a recursive glob), split by the hash of
    each path relative to the glob's root, or validated on the files of `val_pattern`."""
    paths = _glob_files(pattern)
    if not val_pattern:
        if len(paths) < 2:
            raise ConfigError(f"data.text_glob={pattern!r} matches {len(paths)} files; at least "
                              "2 are needed for a training and a validation split")
        root = glob_root(pattern)
        rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
        return file_source({"source": "text", "glob": pattern}, root, rel, val_fraction, seed)
    val = _glob_files(val_pattern)
    if not val:
        raise ConfigError(f"data.val_glob={val_pattern!r} matches no files")
    both = sorted(set(map(os.path.abspath, paths)) & set(map(os.path.abspath, val)))
    if both:
        raise ConfigError(f"data.val_glob={val_pattern!r} and data.text_glob={pattern!r} both "
                          f"match {len(both)} files (e.g. {both[0]}); validation files must "
                          "not be trained on")
    if not paths:
        raise ConfigError(f"data.text_glob={pattern!r} matches no files")
    train, val = [os.path.abspath(p) for p in paths], [os.path.abspath(p) for p in val]
    return file_source({"source": "text", "glob": pattern, "val_glob": val_pattern}, "",
                       train + val, val_fraction, seed, val_paths=val)


def _feature(example: dict[str, Any], feature: str) -> str:
    """`example[a][b]` for feature 'a/b', decoded to str."""
    value: Any = example
    for part in feature.split("/"):
        value = value[part]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tfds_documents(name: str, split: str, feature: str, data_dir: str,
                   max_docs: int) -> Iterator[str]:
    """Texts of a TFDS split in the dataset's fixed order (at most `max_docs`, 0 = all)."""
    import tensorflow_datasets as tfds  # heavy; only imported for TFDS sources

    ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
    if max_docs:
        ds = ds.take(max_docs)
    for example in tfds.as_numpy(ds):
        yield _feature(example, feature)


def tfds_source(d: ml_collections.ConfigDict) -> Source:
    """A TFDS text dataset; the tokenizer sample is the first training documents."""
    desc = {"source": "tfds", "name": d.tfds_name, "split": d.tfds_split,
            "val_split": d.tfds_val_split, "feature": d.tfds_text_feature,
            "data_dir": d.tfds_data_dir, "max_docs": d.tfds_max_docs}

    def split_docs(split: str) -> Iterator[str]:
        return tfds_documents(d.tfds_name, split, d.tfds_text_feature, d.tfds_data_dir,
                              d.tfds_max_docs)

    if d.tfds_val_split:
        def docs(split: str) -> Iterator[str]:
            return split_docs(d.tfds_split if split == "train" else d.tfds_val_split)
    else:
        desc["val_fraction"] = d.val_fraction

        def docs(split: str) -> Iterator[str]:
            # Indices, not texts, are hashed; 'train' and 'val' partition the split exactly
            # (a split that comes out empty is caught by the context guard in `prepare`).
            for i, text in enumerate(split_docs(d.tfds_split)):
                is_val = hash_fraction(f"{d.tfds_name}/{d.tfds_split}/{i}") < d.val_fraction
                if is_val == (split == "val"):
                    yield text

    return Source(desc, docs, lambda max_chars: docs("train"))


def make_source(cfg: ml_collections.ConfigDict) -> Source:
    """The `Source` that `cfg.data.source` names."""
    d = cfg.data
    if d.source == "stdlib":
        return stdlib_source(d.val_fraction, d.seed)
    if d.source == "text":
        return text_source(d.text_glob, d.val_fraction, d.seed, d.get("val_glob", ""))
    if d.source == "tfds":
        return tfds_source(d)
    raise ConfigError(f"data.source={d.source!r} is not one of ['stdlib', 'text', 'tfds']")


# ---------------------------------------------------------------------------- tokenizing


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def encode_documents(tok: Tokenizer, docs: Iterable[str]) -> tuple[np.ndarray, int, int]:
    """(tokens, UTF-8 bytes, documents): each non-empty document's ids followed by eot."""
    parts, n_bytes, n_docs = [], 0, 0
    for doc in docs:
        if doc:
            parts.append(tok.encode_array(doc))
            parts.append(np.array([tok.eot_id], dtype=np.int64))
            n_bytes += len(doc.encode("utf-8"))
            n_docs += 1
    tokens = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    return tokens, n_bytes, n_docs


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _encode_in_worker(docs: list[str]) -> tuple[np.ndarray, int, int]:
    assert _WORKER_TOKENIZER is not None
    return encode_documents(_WORKER_TOKENIZER, docs)


def chunk_documents(docs: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    """Groups documents into lists of about `chunk_chars` characters, in order."""
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def pool_start_method() -> str:
    """'fork' unless JAX or TensorFlow (multithreaded) is loaded, then 'spawn'.

    fork starts fast and never re-runs the caller's script; after JAX/TF have started threads
    it is unsafe, and spawn needs the usual `if __name__ == "__main__":` guard in scripts (the
    `python -m gpt_jax.*` CLIs have it).
    """
    threaded = any(m in sys.modules for m in ("jax", "tensorflow"))
    return "spawn" if threaded else "fork"


def encode_chunks(tok: Tokenizer, docs: Iterable[str],
                  num_workers: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """`encode_documents` over chunks of `docs`, in order, in `num_workers` processes."""
    chunks = chunk_documents(docs)
    if num_workers <= 1:
        for chunk in chunks:
            yield encode_documents(tok, chunk)
        return
    ctx = multiprocessing.get_context(pool_start_method())
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tok,)) as pool:
        yield from pool.imap(_encode_in_worker, chunks)


def write_tokens(path: str, tok: Tokenizer, docs: Iterable[str],
                 num_workers: int) -> dict[str, int]:
    """Tokenizes `docs` into the flat token file `path` (atomically); returns the counts."""
    dtype = token_dtype(tok.vocab_size)
    tmp = f"{path}.tmp-{os.getpid()}"
    n_tokens = n_bytes = n_docs = 0
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for tokens, b, n in encode_chunks(tok, docs, num_workers):
                data = tokens.astype(dtype).tobytes()
                f.write(data)
                digest.update(data)
                n_tokens += len(tokens)
                n_bytes += b
                n_docs += n
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"num_tokens": n_tokens, "num_bytes": n_bytes, "num_docs": n_docs,
            "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------- manifests


def _manifest(split: str, source: Source, tok: Tokenizer, counts: dict[str, int]) -> dict:
    """The JSON record that says a split's token file is complete and what it holds."""
    return {
        "version": MANIFEST_VERSION,
        "split": split,
        "file": f"{split}.bin",
        "dtype": token_dtype(tok.vocab_size).name,
        "num_tokens": counts["num_tokens"],
        "num_bytes": counts["num_bytes"],  # UTF-8 bytes of the split's documents (no eot)
        "num_docs": counts["num_docs"],
        "sha256": counts["sha256"],  # of the token file: checks a copy staged from gs://
        "source": source.description,
        "source_key": source.key,
        "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint,
                      "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
    }


def read_manifest(token_dir: str, split: str) -> dict | None:
    """The split's manifest, or None if it was never completed."""
    path = os.path.join(token_dir, f"{split}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def manifest_problem(manifest: dict, tok: Tokenizer, token_dir: str) -> str | None:
    """Why the manifest's token file cannot be used with `tok`, or None if it can."""
    t = manifest.get("tokenizer", {})
    if t.get("fingerprint") != tok.fingerprint:
        return (f"was tokenized with tokenizer fingerprint {t.get('fingerprint')}, not "
                f"{tok.fingerprint}")
    if t.get("vocab_size") != tok.vocab_size:
        return f"has vocab_size {t.get('vocab_size')}, not {tok.vocab_size}"
    path = os.path.join(token_dir, manifest["file"])
    expected = manifest["num_tokens"] * np.dtype(manifest["dtype"]).itemsize
    if not os.path.exists(path) or os.path.getsize(path) != expected:
        return f"token file {path} is missing or not {expected} bytes long"
    return None


def load_tokens(token_dir: str, manifest: dict) -> np.ndarray:
    """The split's tokens as a read-only memmap (an empty array for an empty split)."""
    if manifest["num_tokens"] == 0:
        return np.zeros((0,), dtype=manifest["dtype"])
    return np.memmap(os.path.join(token_dir, manifest["file"]), dtype=manifest["dtype"],
                     mode="r", shape=(manifest["num_tokens"],))


def build_split(token_dir: str, split: str, source: Source, tok: Tokenizer,
                num_workers: int) -> dict:
    """Tokenizes one split into `token_dir`, manifest last; returns the manifest."""
    os.makedirs(token_dir, exist_ok=True)
    counts = write_tokens(os.path.join(token_dir, f"{split}.bin"), tok, source.docs(split),
                          num_workers)
    if counts["num_bytes"] == 0:  # refuse before writing a manifest that reads as complete
        bad = source.skipped.get(split, [])
        desc = source.description
        where = f"data.text_glob={desc['glob']!r}" if "glob" in desc else f"data.{desc['source']}"
        raise ConfigError(
            f"{where}: the {SPLIT_NAMES[split]} split has no text" + (
                f": {len(bad)} files are not UTF-8 (e.g. {', '.join(bad[:3])}), the rest, if "
                "any, are empty" if bad else ": its documents are empty")
            + "; point it at UTF-8 text files")
    manifest = _manifest(split, source, tok, counts)
    if source.skipped.get(split):
        manifest["skipped_files"] = {"count": len(source.skipped[split]),
                                     "first": source.skipped[split][:10]}
    atomic_write_bytes(os.path.join(token_dir, f"{split}.json"),
                       json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


# ---------------------------------------------------------------------------- gs:// token dirs


def local_cache_dir(cfg: ml_collections.ConfigDict, remote_dir: str) -> str:
    """Where the token files of the gs:// `remote_dir` are staged on this host."""
    key = hashlib.sha256(remote_dir.encode()).hexdigest()[:12]
    root = os.path.expanduser(cfg.data.cache_dir or "~/.cache/gpt_jax")
    return os.path.join(root, "tokens", f"{os.path.basename(remote_dir.rstrip('/'))}-{key}")


def stage_split(remote_dir: str, local_dir: str, split: str, tok: Tokenizer,
                explicit: bool) -> bool:
    """Copies a complete split of the gs:// `remote_dir` into `local_dir` for the memmap
    reader, checked against its manifest (size, sha256, tokenizer fingerprint); reuses a
    copy that already matches. False when the remote split does not exist (yet).

    The manifest is written last on both sides, so a half-copied file is never read as
    complete. Issue #15's store reads windows remotely instead of staging whole files.
    """
    from etils import epath
    remote = epath.Path(remote_dir)
    try:
        manifest = json.loads((remote / f"{split}.json").read_text())
    except FileNotFoundError:
        return False
    where = f"{remote / (split + '.json')}"
    t = manifest.get("tokenizer", {})
    if t.get("fingerprint") != tok.fingerprint:
        if explicit:
            raise ConfigError(f"data.token_dir={remote_dir!r}: {where} was tokenized with "
                              f"tokenizer fingerprint {t.get('fingerprint')}, not "
                              f"{tok.fingerprint}; point data.token_dir elsewhere")
        return False
    expected = manifest["num_tokens"] * np.dtype(manifest["dtype"]).itemsize
    source = remote / manifest["file"]
    size = source.stat().length if source.exists() else -1
    if size != expected:
        raise ConfigError(f"{source}: {size if size >= 0 else 'missing'} bytes, but its "
                          f"manifest {where} says {expected}; rebuild that token directory")
    local = read_manifest(local_dir, split)
    target = os.path.join(local_dir, manifest["file"])
    if local == manifest and os.path.exists(target) and os.path.getsize(target) == expected:
        return True
    os.makedirs(local_dir, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with source.open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        if manifest.get("sha256") and file_sha256(tmp) != manifest["sha256"]:
            raise ConfigError(f"{source}: its content does not match the sha256 in {where}; "
                              "rebuild that token directory")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    atomic_write_bytes(os.path.join(local_dir, f"{split}.json"),
                       json.dumps(manifest, indent=2, sort_keys=True).encode())
    return True


def upload_split(local_dir: str, remote_dir: str, manifest: dict) -> None:
    """Copies a split built on this host to gs:// (token file first, manifest last), so the
    next run, and every other host, stages it instead of tokenizing again."""
    from etils import epath
    remote = epath.Path(remote_dir)
    remote.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(local_dir, manifest["file"]), "rb") as src, \
            (remote / manifest["file"]).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    atomic_write_bytes(remote / f"{manifest['split']}.json",
                       json.dumps(manifest, indent=2, sort_keys=True).encode())


# ---------------------------------------------------------------------------- corpus


@dataclasses.dataclass
class Corpus:
    """A prepared corpus: the tokenizer, token arrays per split and their manifests."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    manifests: dict[str, dict]
    directory: str

    def tokens(self, split: str) -> np.ndarray:
        """The token array of 'train' or 'val'."""
        return {"train": self.train, "val": self.val}[split]

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per token; bits per byte = loss_nats / ln 2 / bytes_per_token."""
        m = self.manifests[split]
        return m["num_bytes"] / max(m["num_tokens"], 1)


def default_token_dir(cfg: ml_collections.ConfigDict, source: Source, tok: Tokenizer) -> str:
    """`<data_dir>/tokens/<source key>-<kind><vocab>-<fingerprint prefix>`."""
    name = f"{source.key}-{tok.kind}{tok.vocab_size}-{tok.fingerprint[:12]}"
    return os.path.join(cfg.data.data_dir, "tokens", name)


def check_context(corpus: Corpus, context: int) -> None:
    """Raises ConfigError unless each split holds at least one window of context + 1 tokens."""
    for split in ("val", "train"):
        n = len(corpus.tokens(split))
        if n < context + 1:
            raise ConfigError(
                f"model.context={context} exceeds the {n} tokens of the {SPLIT_NAMES[split]} "
                f"split (a window needs context + 1 = {context + 1}); use a smaller "
                "model.context or more data")


def prepare(cfg: ml_collections.ConfigDict) -> Corpus:
    """Builds (or reuses) the tokenizer and both token files, and checks them against cfg.

    Raises ConfigError naming the field for: a vocabulary larger than `model.vocab_size`, a
    `model.context` longer than a split, and a `data.token_dir` holding other tokens.
    """
    d = cfg.data
    source = make_source(cfg)
    tok = tokenizer_lib.from_config(cfg, source.key, source.sample)
    explicit_dir = d.token_dir
    token_dir = explicit_dir or default_token_dir(cfg, source, tok)
    remote_dir = None
    if "://" in token_dir:  # the memmap reader needs local files: stage them on this host
        remote_dir, token_dir = token_dir, local_cache_dir(cfg, token_dir)
    manifests = {}
    for split in SPLITS:
        staged = remote_dir is not None and stage_split(remote_dir, token_dir, split, tok,
                                                        bool(explicit_dir))
        manifest = read_manifest(token_dir, split)
        problem = None if manifest is None else manifest_problem(manifest, tok, token_dir)
        if manifest is not None and problem and explicit_dir:
            raise ConfigError(f"data.token_dir={explicit_dir!r}: the {SPLIT_NAMES[split]} "
                              f"split {problem}; delete it or point data.token_dir elsewhere")
        if manifest is None or problem:
            manifest = build_split(token_dir, split, source, tok, d.num_workers)
        if remote_dir is not None and not staged and jax.process_index() == 0:
            upload_split(token_dir, remote_dir, manifest)
        manifests[split] = manifest
    if not os.path.exists(os.path.join(token_dir, tok.file_name)):
        tok.save(token_dir)
    corpus = Corpus(tok, load_tokens(token_dir, manifests["train"]),
                    load_tokens(token_dir, manifests["val"]), manifests, token_dir)
    check_context(corpus, cfg.model.context)
    return corpus


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------- batches


def num_windows(num_tokens: int, context: int) -> int:
    """Non-overlapping windows of context + 1 tokens starting at multiples of `context`."""
    return max(num_tokens - 1, 0) // context


@functools.lru_cache(maxsize=4)
def epoch_permutation(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the windows in `epoch` (read-only, cached: computed once per epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_windows)
    perm.flags.writeable = False
    return perm


def window_ids(n_windows: int, seed: int, start: int, count: int) -> np.ndarray:
    """Windows at positions [start, start + count) of the epoch permutations end to end."""
    pos = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(pos, n_windows)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = epoch_permutation(n_windows, seed, int(epoch))[offsets[mask]]
    return out


def gather_windows(tokens: np.ndarray, ids: np.ndarray, context: int) -> np.ndarray:
    """int32 array [len(ids), context + 1]: window i is tokens[i*context : i*context+context+1]."""
    index = ids[:, None] * context + np.arange(context + 1, dtype=np.int64)[None, :]
    return np.asarray(tokens[index], dtype=np.int32)


def _local_rows(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the "
                         f"{process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return global_batch // process_count


def _windows_or_raise(tokens: np.ndarray, context: int) -> int:
    n = num_windows(len(tokens), context)
    if n < 1:
        raise ValueError(f"context={context} needs at least {context + 1} tokens, the split "
                         f"has {len(tokens)}")
    return n


def train_batch(tokens: np.ndarray, *, seed: int, step: int, global_batch: int, context: int,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This process's rows of the global batch for `step`: int32 [B / pc, context + 1].

    A pure function of (tokens, seed, step, ...): within an epoch no window repeats, and a
    resumed run sees exactly the batches of an uninterrupted one. Process p gets rows
    [p*B/pc, (p+1)*B/pc) of the global batch. Inputs are [:, :-1], targets [:, 1:].
    """
    local = _local_rows(global_batch, process_index, process_count)
    n = _windows_or_raise(tokens, context)
    ids = window_ids(n, seed, step * global_batch + process_index * local, local)
    return gather_windows(tokens, ids, context)


def epoch_at(step: int, global_batch: int, n_windows: int) -> float:
    """How many epochs the first `step` steps consumed (for logging)."""
    return step * global_batch / n_windows


def eval_window_ids(n_windows: int, total: int) -> np.ndarray:
    """`total` fixed windows: evenly spread over the split, or all of them cyclically."""
    if total <= n_windows:
        return np.arange(total, dtype=np.int64) * n_windows // total
    return np.arange(total, dtype=np.int64) % n_windows


def eval_batches(tokens: np.ndarray, *, global_batch: int, context: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
    """`num_batches` deterministic batches of validation windows, this process's rows of each.

    Same shapes and host slicing as `train_batch`; the same windows on every call, spread
    evenly over the split so a few batches still see all of its documents.
    """
    local = _local_rows(global_batch, process_index, process_count)
    ids = eval_window_ids(_windows_or_raise(tokens, context), num_batches * global_batch)
    for b in range(num_batches):
        start = b * global_batch + process_index * local
        yield gather_windows(tokens, ids[start:start + local], context)


# ---------------------------------------------------------------------------- example batches
# Fine-tuning, SFT and the reward model hold small splits as arrays of examples (one row
# each); `loop.microbatched` then slices a batch for this host.


def read_jsonl(path: str, required: Sequence[str]) -> list[dict]:
    """All objects of a JSONL file; each must have the `required` keys."""
    if not path:
        raise ConfigError(f"no JSONL file given for the {list(required)} data")
    from etils import epath
    rows = []
    try:
        text = epath.Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such JSONL file") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        missing = [k for k in required if k not in row] if isinstance(row, dict) else required
        if missing:
            raise ConfigError(f"{path}:{n}: missing {list(missing)}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no examples")
    return rows


def epoch_batch(arrays: dict[str, np.ndarray], *, seed: int, step: int,
                batch_size: int) -> dict[str, np.ndarray]:
    """Batch `step` of a seeded per-epoch shuffle: a pure function of (seed, step)."""
    n = len(next(iter(arrays.values())))
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ConfigError(f"train.batch_size={batch_size} exceeds the {n} training examples")
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[i * batch_size:(i + 1) * batch_size]
    return {k: v[idx] for k, v in arrays.items()}
