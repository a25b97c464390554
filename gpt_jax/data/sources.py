"""Where documents come from, and which split each belongs to.

Sources (`data.source`, or one entry of `data.sources` per named source of a mixture):
- 'stdlib': the `.py` files of the running interpreter's standard library
  (`sysconfig.get_paths()['stdlib']`), `site-packages`/`dist-packages` skipped, test
  directories kept (about 1800 files, ~34 MB on CPython 3.11). Files that are not valid
  UTF-8 (a few deliberate encoding tests) are skipped.
- 'text': files matched by `data.text_glob` (recursive `**` allowed), read as UTF-8: local
  paths with `glob`, and `gs://` (any Beam filesystem) with Beam's file I/O
  (`FileSystems.match` on the launcher, `FileSystems.open` on the workers), so remote workers
  read the same files.
- 'tfds': a TFDS text dataset (`data.tfds_*`), read file after file (the split's TFDS file
  instructions; the Beam pipeline reads each shard file on its own worker).
- 'hf': a Hugging Face `datasets` dataset (`data.hf_*`): a builder name such as 'json' or
  'parquet' with local `data.hf_data_files`, or a hub name where a network exists; read in
  streaming mode, so nothing is copied into an Arrow cache first.

File sources are split into train/validation by a stable hash (sha1) of each file's path
relative to its root (the stdlib for 'stdlib'; for 'text' the glob's leading directories, so
`text/*.txt` and `/abs/path/text/*.txt` split alike) against `data.val_fraction`; both splits
are guaranteed non-empty. With `data.val_glob` the 'text' validation files are named instead.
Record sources ('tfds' without `tfds_val_split`, 'hf') split by the hash of the record index.
Parquet files may instead split as a peer's recipe does (`data.val_split_rule`, `route`):
'first' makes the first `data.val_docs` records validation (llm.c's fineweb.py: its first
shard of 100M tokens), 'permutation' the first ceil(val_fraction * n) of
`np.random.default_rng(data.val_split_seed).permutation(n)` (nanoGPT's prepare.py through
Hugging Face `datasets`' train_test_split, whose code this is).

Each document has an index (its position in the source's fixed order), so the in-process
tokenizer and the Beam pipeline (`data.pipeline`) write the same tokens in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from gpt_jax.config import VAL_SPLIT_RULES, ConfigError

SPLITS = ("train", "val")
SPLIT_NAMES = {"train": "training", "val": "validation"}
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
SOURCE_KINDS = ("stdlib", "text", "tfds", "hf")


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
    # file sources: (absolute path, split) of every document in order, so a distributed
    # reader can fan out over files; None for record sources
    files: list[tuple[str, str]] | None = None
    # record sources read by their own shards (parquet files, TFDS shard files, `datasets`
    # shards): JSON-able descriptors that `read_shard` reads, each record once; None: one
    # sequence
    shards: list[dict[str, Any]] | None = None
    # what went in, for the manifest: each input file's path, size and checksum/generation
    inputs: list[dict[str, Any]] | None = None
    # record sources read as one sequence: every record once as (index, split, text), so a
    # pipeline reads it once, not once per split; None: read each split with `docs`
    routed: Callable[[], Iterator[tuple[int, str, str]]] | None = None

    @property
    def key(self) -> str:
        """Short stable name: '<source>-<sha1 of the description>'."""
        blob = json.dumps(self.description, sort_keys=True).encode()
        return f"{self.description['source']}-{hashlib.sha1(blob).hexdigest()[:10]}"


def _remote(path: str) -> bool:
    return "://" in path


def read_bytes(path: str) -> bytes:
    """A file's bytes: local, or through Beam's filesystems (gs://, ...)."""
    if not _remote(path):
        with open(path, "rb") as f:
            return f.read()
    # Imported on use: Beam (the [data] extra) serves remote paths only.
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(path) as f:
        return f.read()


def read_text(path: str) -> str | None:
    """The file's text as UTF-8, or None if it is not valid UTF-8."""
    data = read_bytes(path)
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


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a local file, or of a remote one through Beam's filesystems."""
    if not _remote(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    from apache_beam.io.filesystems import FileSystems  # on use: remote paths only
    meta = FileSystems.match([path])[0].metadata_list[0]
    return meta.size_in_bytes, int(meta.last_updated_in_seconds * 1e9)


def _files_digest(root: str, rel_paths: Sequence[str],
                  stats: dict[str, tuple[int, int]] | None = None) -> str:
    """sha1 over (path, size, mtime) of the files, so edited corpora get new cache keys;
    `stats` (path -> (size, mtime ns)) saves a request per remote file."""
    h = hashlib.sha1()
    for rel in rel_paths:
        path = os.path.join(root, rel)
        size, mtime = (stats or {}).get(path) or _stat(path)
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def file_source(description: dict[str, Any], root: str, rel_paths: Sequence[str],
                val_fraction: float, seed: int, val_paths: Sequence[str] | None = None,
                stats: dict[str, tuple[int, int]] | None = None) -> Source:
    """A source of text files split by the hash of their relative path, or with `val_paths`
    (some of `rel_paths`) as the validation split."""
    paths = sorted(rel_paths)
    if val_paths is None:
        splits = assign_splits(paths, val_fraction)
    else:
        named = set(val_paths)
        splits = ["val" if p in named else "train" for p in paths]
    by_split = {s: [p for p, sp in zip(paths, splits) if sp == s] for s in SPLITS}
    description = dict(description, files=len(paths), digest=_files_digest(root, paths, stats))
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

    files = [(os.path.join(root, p), s) for p, s in zip(paths, splits)]
    return Source(description, lambda split: docs_of(by_split[split], split), sample, skipped,
                  files)


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


_STATS: dict[str, tuple[int, int]] = {}  # remote path -> (size, mtime ns) from its match


def _glob_files(pattern: str) -> list[str]:
    """Sorted files matching `pattern`: local `glob` (recursive `**`), or Beam's
    `FileSystems.match` for gs:// and other remote filesystems."""
    if not _remote(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    from apache_beam.io.filesystems import FileSystems  # on use: remote globs only
    metas = [m for r in FileSystems.match([pattern]) for m in r.metadata_list
             if not m.path.endswith("/")]
    _STATS.update({m.path: (m.size_in_bytes, int(m.last_updated_in_seconds * 1e9))
                   for m in metas})
    return sorted(m.path for m in metas)


def _absolute(path: str) -> str:
    return path if _remote(path) else os.path.abspath(path)


def text_source(pattern: str, val_fraction: float, seed: int, val_pattern: str = "") -> Source:
    """Local UTF-8 text files matched by `pattern` (a recursive glob), split by the hash of
    each path relative to the glob's root, or validated on the files of `val_pattern`."""
    paths = _glob_files(pattern)
    if not val_pattern:
        if len(paths) < 2:
            raise ConfigError(f"data.text_glob={pattern!r} matches {len(paths)} files; at least "
                              "2 are needed for a training and a validation split")
        root = glob_root(pattern)
        rel = [os.path.relpath(p, root).replace(os.sep, "/") if not _remote(p)
               else p[len(root):].lstrip("/") for p in paths]
        return file_source({"source": "text", "glob": pattern}, root, rel, val_fraction, seed,
                           stats=_STATS)
    val = _glob_files(val_pattern)
    if not val:
        raise ConfigError(f"data.val_glob={val_pattern!r} matches no files")
    both = sorted(set(map(_absolute, paths)) & set(map(_absolute, val)))
    if both:
        raise ConfigError(f"data.val_glob={val_pattern!r} and data.text_glob={pattern!r} both "
                          f"match {len(both)} files (e.g. {both[0]}); validation files must "
                          "not be trained on")
    if not paths:
        raise ConfigError(f"data.text_glob={pattern!r} matches no files")
    train, val = [_absolute(p) for p in paths], [_absolute(p) for p in val]
    return file_source({"source": "text", "glob": pattern, "val_glob": val_pattern}, "",
                       train + val, val_fraction, seed, val_paths=val, stats=_STATS)


def _feature(example: dict[str, Any], feature: str) -> str:
    """`example[a][b]` for feature 'a/b', decoded to str."""
    value: Any = example
    for part in feature.split("/"):
        value = value[part]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_builder(name: str, data_dir: str) -> Any:
    """The TFDS builder of `name` (a registered dataset, or one prepared in `data_dir` that
    this process has no code for, as on a Beam worker); ConfigError naming the field."""
    import tensorflow_datasets as tfds  # heavy; only imported for TFDS sources

    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.tfds_name={name!r}: {str(e).strip().splitlines()[0]}") from None


def _ordered_read_config() -> Any:
    """Files one after another (TFDS interleaves 16 files in blocks of 16 by default, even
    with shuffle_files=False): the order in which `tfds_shards` numbers the records."""
    import tensorflow_datasets as tfds
    return tfds.ReadConfig(interleave_cycle_length=1)


def tfds_documents(name: str, split: str, feature: str, data_dir: str,
                   max_docs: int) -> Iterator[str]:
    """Texts of a TFDS split in the dataset's fixed order, its files one after another (at
    most `max_docs`, 0 = all): one sequential read, what the in-process path tokenizes.
    `tfds.load`, so a registered dataset not yet on disk is downloaded and prepared first."""
    import tensorflow_datasets as tfds

    ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False,
                   read_config=_ordered_read_config())
    if max_docs:
        ds = ds.take(max_docs)
    for example in tfds.as_numpy(ds):
        yield _feature(example, feature)


def tfds_shards(name: str, split: str, data_dir: str, max_docs: int,
                route: str | None) -> list[dict[str, Any]] | None:
    """One shard per file of the split's TFDS file instructions (its own shard files, in the
    order `tfds_documents` reads them): {tfds_split: the absolute slice of its base split that
    is exactly that file's part, first: index of its first record in the split, rows, route:
    'train'/'val', or None to route by the record's hash, path}. With `max_docs` the first
    max_docs records in that order, as `tfds_documents` takes them. None where the metadata
    lists no splits (a registered dataset not yet prepared, which `tfds_documents` downloads
    and prepares; `tfds.testing.mock_data`, which serves records without files): then the
    split is read as one sequence."""
    splits = _tfds_builder(name, data_dir).info.splits
    if not list(splits.keys()):
        return None
    starts: dict[str, tuple[str, int]] = {}  # shard file -> (its split, its first record there)
    for base in splits.keys():
        first = 0
        for fi in splits[base].file_instructions:
            starts[fi.filename] = (base, first)
            first += fi.examples_in_shard
    try:
        instructions = splits[split].file_instructions
    except (KeyError, ValueError) as e:
        raise ConfigError(f"split {split!r} of TFDS dataset {name!r}: "
                          f"{str(e).strip().splitlines()[0]}") from None
    shards, first = [], 0
    for fi in instructions:
        rows = min(fi.take, max_docs - first) if max_docs else fi.take
        if max_docs and rows <= 0:
            break
        if rows > 0:
            base, offset = starts[fi.filename]
            start = offset + fi.skip
            shards.append({"tfds_split": f"{base}[{start}:{start + rows}]", "first": first,
                           "rows": rows, "route": route, "path": fi.filename})
            first += rows
    return shards


def read_tfds_shard(d: ml_collections.ConfigDict, shard: dict[str, Any]
                    ) -> Iterator[tuple[int, str]]:
    """(index in the split, text) of one TFDS shard (`tfds_shards`): its records only."""
    import tensorflow_datasets as tfds

    ds = _tfds_builder(d.tfds_name, d.tfds_data_dir).as_dataset(
        split=shard["tfds_split"], shuffle_files=False, read_config=_ordered_read_config())
    n = 0
    for n, example in enumerate(tfds.as_numpy(ds), 1):
        yield shard["first"] + n - 1, _feature(example, d.tfds_text_feature)
    if n != shard["rows"]:
        raise RuntimeError(f"TFDS shard {shard['path']} gave {n} of its {shard['rows']} records")


def tfds_split_key(d: ml_collections.ConfigDict) -> str:
    """The key `record_split` hashes with a TFDS record's index (no validation split)."""
    return f"{d.tfds_name}/{d.tfds_split}"


def tfds_source(d: ml_collections.ConfigDict) -> Source:
    """A TFDS text dataset, read by its own shard files (`tfds_shards`: each record once, N
    workers read N shards) in the pipeline and as one sequence in-process, in the same order;
    the tokenizer sample is the first training documents."""
    desc = {"source": "tfds", "name": d.tfds_name, "split": d.tfds_split,
            "val_split": d.tfds_val_split, "feature": d.tfds_text_feature,
            "data_dir": d.tfds_data_dir, "max_docs": d.tfds_max_docs,
            "order": "files in turn"}  # not TFDS's default interleave: older caches differ

    def split_docs(split: str) -> Iterator[str]:
        return tfds_documents(d.tfds_name, split, d.tfds_text_feature, d.tfds_data_dir,
                              d.tfds_max_docs)

    named = (("train", d.tfds_split), ("val", d.tfds_val_split)) if d.tfds_val_split else \
        ((None, d.tfds_split),)
    listed = [tfds_shards(d.tfds_name, name, d.tfds_data_dir, d.tfds_max_docs, route=route)
              for route, name in named]
    shards = None if None in listed else [s for part in listed for s in part or []]
    inputs = None if shards is None else [
        file_record(path) for path in dict.fromkeys(s["path"] for s in shards)]
    if d.tfds_val_split:
        def docs(split: str) -> Iterator[str]:
            return split_docs(d.tfds_split if split == "train" else d.tfds_val_split)

        return Source(desc, docs, lambda max_chars: docs("train"), shards=shards,
                      inputs=inputs)
    desc["val_fraction"] = d.val_fraction

    def routed() -> Iterator[tuple[int, str, str]]:
        # Indices, not texts, are hashed; 'train' and 'val' partition the split exactly
        # (a split that comes out empty is caught by the context guard in `prepare`).
        key = tfds_split_key(d)
        for i, text in enumerate(split_docs(d.tfds_split)):
            yield i, record_split(key, i, d.val_fraction), text

    return _routed_source(desc, routed, shards=shards, inputs=inputs)


def _routed_source(desc: dict[str, Any], routed: Callable[[], Iterator[tuple[int, str, str]]],
                   **fields: Any) -> Source:
    """A record source read as one sequence routed by record; docs(split) filters it."""
    def docs(split: str) -> Iterator[str]:
        return (text for _, s, text in routed() if s == split)
    return Source(desc, docs, lambda max_chars: docs("train"), routed=routed, **fields)


SHARD_STRIDE = 1 << 32  # record index of a Hugging Face shard's row: shard * stride + row


def hf_stream(d: ml_collections.ConfigDict) -> Any:
    """The split as a streaming `datasets.IterableDataset` (nothing copied to a cache)."""
    import datasets  # optional, heavy: only for 'hf' sources

    files = d.hf_data_files or None
    if files and not any(glob.glob(p, recursive=True) for p in files.split(",")
                         if "://" not in p):
        raise ConfigError(f"data.hf_data_files={d.hf_data_files!r} matches no files")
    try:
        return datasets.load_dataset(d.hf_path, d.hf_name or None, split=d.hf_split,
                                     data_files=files.split(",") if files else None,
                                     streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ConfigError(f"data.hf_path={d.hf_path!r}: {str(e).splitlines()[0]}") from None


def _texts(d: ml_collections.ConfigDict, examples: Iterable[dict[str, Any]]) -> Iterator[str]:
    for example in examples:
        if d.hf_text_field not in example:
            raise ConfigError(f"data.hf_text_field={d.hf_text_field!r} is not a field of "
                              f"{d.hf_path!r}; it has {sorted(example)}")
        yield str(example[d.hf_text_field])


def hf_documents(d: ml_collections.ConfigDict) -> Iterator[str]:
    """Texts of a Hugging Face dataset split in its fixed order (at most `hf_max_docs`)."""
    texts = _texts(d, hf_stream(d))
    return itertools.islice(texts, d.hf_max_docs) if d.hf_max_docs else texts


def read_hf_shard(d: ml_collections.ConfigDict, shard: dict[str, Any]
                  ) -> Iterator[tuple[int, str]]:
    """(record index, text) of shard {shard: i, of: n} of the split (its own data files)."""
    ds = hf_stream(d).shard(num_shards=shard["of"], index=shard["shard"])
    for row, text in enumerate(_texts(d, ds)):
        yield shard["shard"] * SHARD_STRIDE + row, text


def _fs(path: str) -> tuple[Any, str]:
    import fsspec  # gcsfs for gs://, huggingface_hub for hf://
    return fsspec.core.url_to_fs(path)


def _match_files(patterns: str) -> list[str]:
    """Sorted files of comma-separated globs: local, gs://, or hf://datasets/<name>/..."""
    out: list[str] = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        if not _remote(pattern):
            out += [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        else:
            fs, _ = _fs(pattern)
            proto = pattern.split("://", 1)[0]
            out += [f"{proto}://{p}" for p in fs.glob(pattern) if fs.isfile(p)]
    return sorted(set(out))


def file_record(path: str) -> dict[str, Any]:
    """Provenance of one input file: path, size, and what identifies its bytes without
    reading them (local: mtime; gs://: generation and crc32c; hf://: the LFS sha256)."""
    if not _remote(path):
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, inner = _fs(path)
    info = fs.info(inner)
    record = {"path": path, "size": int(info["size"])}
    for key in ("generation", "crc32c", "md5Hash"):
        if info.get(key):
            record[key] = str(info[key])
    if isinstance(info.get("lfs"), dict) and info["lfs"].get("sha256"):
        record["sha256"] = info["lfs"]["sha256"]
    return record


def _open_parquet(path: str) -> Any:
    import pyarrow.parquet as pq  # with `datasets` (the [data] extra): parquet sources only
    if not _remote(path):
        return pq.ParquetFile(path)
    fs, inner = _fs(path)
    return pq.ParquetFile(fs.open(inner, "rb"))


def parquet_shards(files: Sequence[str], max_docs: int) -> list[dict[str, Any]]:
    """One shard per file: {file, first (global index of its first row), rows to read},
    from the files' footers; with `max_docs` the first max_docs rows in file order."""
    shards, first = [], 0
    for path in files:
        rows = _open_parquet(path).metadata.num_rows
        if max_docs:
            rows = min(rows, max_docs - first)
        if rows <= 0:
            break
        shards.append({"file": path, "first": first, "rows": rows})
        first += rows
    return shards


def read_shard(d: ml_collections.ConfigDict, shard: dict[str, Any]
               ) -> Iterator[tuple[int, str]]:
    """(record index, text) of one shard of a record source: a TFDS shard file, a parquet
    file or a shard of a `datasets` split."""
    if "tfds_split" in shard:
        return read_tfds_shard(d, shard)
    if "file" in shard:
        return read_parquet_shard(shard, d.hf_text_field)
    return read_hf_shard(d, shard)


def read_parquet_shard(shard: dict[str, Any], text_field: str) -> Iterator[tuple[int, str]]:
    """(global index, text) of one parquet shard's rows, reading only the text column."""
    pf = _open_parquet(shard["file"])
    if text_field not in pf.schema_arrow.names:
        raise ConfigError(f"data.hf_text_field={text_field!r} is not a column of "
                          f"{shard['file']}; it has {pf.schema_arrow.names}")
    index, end = shard["first"], shard["first"] + shard["rows"]
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if index >= end:
                return
            yield index, "" if text is None else str(text)
            index += 1


def record_split(key: str, index: int, val_fraction: float) -> str:
    """'val' or 'train' for record `index` of the source keyed `key` (hash of both)."""
    return "val" if hash_fraction(f"{key}/{index}") < val_fraction else "train"


def split_key(d: ml_collections.ConfigDict) -> str:
    """The key `record_split` hashes with a record's index (the 'hf' source's formula)."""
    return f"{d.hf_path}/{d.hf_split}"


@functools.lru_cache(maxsize=4)
def permutation_val(seed: int, n: int, val_fraction: float) -> frozenset[int]:
    """Indices of the validation records of `datasets.Dataset.train_test_split(test_size=
    val_fraction, seed=seed, shuffle=True)` over n records: the first ceil(val_fraction * n)
    of numpy's default_rng(seed).permutation(n), as its code computes them (datasets 5.2)."""
    n_val = math.ceil(val_fraction * n)
    return frozenset(np.random.default_rng(seed).permutation(n)[:n_val].tolist())


def route(d: ml_collections.ConfigDict, shard: dict[str, Any], index: int) -> str:
    """'train' or 'val' for record `index` of a parquet shard under `data.val_split_rule`:
    'hash' (the hash of the index), 'first' (index < data.val_docs) or 'permutation'
    (`permutation_val` over the source's `total` records)."""
    rule = d.get("val_split_rule", "hash")
    if rule == "first":
        return "val" if index < d.val_docs else "train"
    if rule == "permutation":
        val = permutation_val(d.val_split_seed, shard["total"], d.val_fraction)
        return "val" if index in val else "train"
    return record_split(split_key(d), index, d.val_fraction)


def check_split_rule(d: ml_collections.ConfigDict, field: str = "data.val_split_rule") -> None:
    """ConfigError unless `data.val_split_rule` is one this source can follow: the peers'
    rules need the global record order and count that only parquet files' footers give."""
    rule = d.get("val_split_rule", "hash")
    if rule not in VAL_SPLIT_RULES:
        raise ConfigError(f"{field}={rule!r} is not one of {list(VAL_SPLIT_RULES)}")
    if rule != "hash" and not (d.source == "hf" and d.hf_path == "parquet"
                               and d.hf_data_files):
        raise ConfigError(f"{field}={rule!r} applies only to parquet files (data.source='hf', "
                          "data.hf_path='parquet', data.hf_data_files); 'hash' splits any source")


def shard_records(d: ml_collections.ConfigDict, shard: dict[str, Any]
                  ) -> Iterator[tuple[int, str, str]]:
    """(record index, 'train' or 'val', text) of one shard of a record source: routed by the
    shard (a TFDS split of its own), by `route` for a parquet file, or by the hash of the
    record's index."""
    fixed = shard.get("route")
    key = tfds_split_key(d) if "tfds_split" in shard else split_key(d)
    for index, text in read_shard(d, shard):
        if fixed:
            yield index, fixed, text
        elif "file" in shard:
            yield index, route(d, shard, index), text
        else:
            yield index, record_split(key, index, d.val_fraction), text


def parquet_source(d: ml_collections.ConfigDict) -> Source:
    """Parquet files (`data.hf_path='parquet'`, `data.hf_data_files`: local, gs:// or
    hf://datasets/... globs; FineWeb, FineWeb-Edu and OpenWebText ship this layout), read
    by file: each worker reads its own files, each record once, routed to train or
    validation by `route` (`data.val_split_rule`)."""
    files = _match_files(d.hf_data_files)
    if not files:
        raise ConfigError(f"data.hf_data_files={d.hf_data_files!r} matches no files")
    shards = parquet_shards(files, d.hf_max_docs)
    inputs = [file_record(f) for f in files[:len(shards)]]
    desc = {"source": "hf", "path": "parquet", "data_files": d.hf_data_files,
            "text_field": d.hf_text_field, "max_docs": d.hf_max_docs,
            "val_fraction": d.val_fraction,
            "digest": hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()}
    rule = d.get("val_split_rule", "hash")
    if rule == "first":  # 'hash' keeps the description (and the cache keys) it always had
        desc.update(val_split_rule=rule, val_docs=d.val_docs)
    elif rule == "permutation":
        total = sum(s["rows"] for s in shards)
        shards = [dict(s, total=total) for s in shards]
        desc.update(val_split_rule=rule, val_split_seed=d.val_split_seed)
    docs = _sharded_docs(d, shards)
    return Source(desc, docs, lambda max_chars: docs("train"), shards=shards, inputs=inputs)


def _sharded_docs(d: ml_collections.ConfigDict, shards: list[dict[str, Any]]
                  ) -> Callable[[str], Iterator[str]]:
    """docs(split) of a source read by shards: the shards in order, routed by record index."""
    def docs(split: str) -> Iterator[str]:
        for shard in shards:
            for _, routed, text in shard_records(d, shard):
                if routed == split:
                    yield text
    return docs


def hf_source(d: ml_collections.ConfigDict) -> Source:
    """A Hugging Face dataset (FineWeb, OpenWebText, local JSONL/Parquet...), split by the hash
    of each record's index; the tokenizer sample is the first training documents. Parquet
    files (`hf_path='parquet'`) are read by file (`parquet_source`)."""
    if d.hf_path == "parquet" and d.hf_data_files:
        return parquet_source(d)
    desc = {"source": "hf", "path": d.hf_path, "name": d.hf_name, "split": d.hf_split,
            "data_files": d.hf_data_files, "text_field": d.hf_text_field,
            "max_docs": d.hf_max_docs, "val_fraction": d.val_fraction}
    inputs = None
    if d.hf_data_files:  # local files: their sizes and times key the caches, as for 'text'
        paths = sorted(p for pat in d.hf_data_files.split(",")
                       for p in glob.glob(pat, recursive=True))
        desc["digest"] = _files_digest("", paths)
        inputs = [file_record(p) for p in paths]
    if not d.hf_max_docs:  # read by the dataset's own shards (its data files), N in parallel
        n = hf_stream(d).n_shards
        desc["shards"] = n
        shards = [{"shard": i, "of": n} for i in range(n)]
        docs = _sharded_docs(d, shards)
        return Source(desc, docs, lambda max_chars: docs("train"), shards=shards,
                      inputs=inputs)
    # The first hf_max_docs records need the dataset's order: one sequence, read once.
    def routed() -> Iterator[tuple[int, str, str]]:
        key = split_key(d)
        for i, text in enumerate(hf_documents(d)):
            yield i, record_split(key, i, d.val_fraction), text

    return _routed_source(desc, routed, inputs=inputs)


def source_specs(cfg: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Name -> the `data` fields of each source: `data.sources` entries laid over `data`
    (a mixture), or the one source `data.source` named after itself."""
    d = cfg.data
    if not d.get("sources"):
        return {d.source: d}
    specs = {}
    for name, overrides in d.sources.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"data.sources.{name}: a source name may only hold letters, "
                              "digits, '_', '.' and '-' (it names a directory of the store)")
        spec = ml_collections.ConfigDict(d.to_dict())
        del spec["sources"]
        for key, value in overrides.items():
            if key not in spec:
                fields = ", ".join(sorted(k for k in spec if k != "mixture"))
                raise ConfigError(f"data.sources.{name}.{key}: no such data field; a source "
                                  f"sets some of: {fields}")
            if isinstance(spec[key], ml_collections.ConfigDict):  # e.g. dedup: merge fields
                for field, v in dict(value).items():
                    if field not in spec[key]:
                        raise ConfigError(f"data.sources.{name}.{key}.{field}: no such field; "
                                          f"data.{key} has: {', '.join(sorted(spec[key]))}")
                    spec[key][field] = v
            else:
                spec[key] = value
        specs[name] = spec
    return specs


def make_source_from(d: ml_collections.ConfigDict, field: str = "data.source") -> Source:
    """The `Source` that the data fields `d` describe (`field` names `d.source` in errors)."""
    check_split_rule(d, field.rsplit(".", 1)[0] + ".val_split_rule")
    if d.source == "stdlib":
        return stdlib_source(d.val_fraction, d.seed)
    if d.source == "text":
        return text_source(d.text_glob, d.val_fraction, d.seed, d.get("val_glob", ""))
    if d.source == "tfds":
        return tfds_source(d)
    if d.source == "hf":
        return hf_source(d)
    raise ConfigError(f"{field}={d.source!r} is not one of {list(SOURCE_KINDS)}")


def make_source(cfg: ml_collections.ConfigDict) -> Source:
    """The `Source` that `cfg.data.source` names."""
    return make_source_from(cfg.data)
