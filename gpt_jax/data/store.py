"""The token store: fixed-size shards of flat token arrays and a manifest, local or `gs://`.

Layout of a store directory (any `etils.epath` path):

    manifest.json                     written last: a store without it is incomplete
    <tokenizer file>                  the tokenizer that made it (sentencepiece .model, ...)
    <source>/<split>-00000.bin        flat little-endian uint16 (uint32 past 65535 ids),
    <source>/<split>-00001.bin        `shard_tokens` tokens each, the last one shorter

Why flat arrays and not ArrayRecord: training reads windows of `context + 1` tokens that
start anywhere and cross document boundaries. In a flat array with fixed-size shards a window
is one byte range (two at a shard boundary) found by a division, read with `pread` from a
local memmap or one ranged GET from Cloud Storage; no per-record framing to undo, no index
lookups, and the concatenated shards are exactly the token file the in-process path used to
write, so both paths give bit-identical batches. ArrayRecord would store documents as records
and need a second index from token offsets to records.

Each split of each source has, in the manifest, its shard list (file, tokens, sha256 and
crc32c of the bytes written), token, document and UTF-8 byte counts; the manifest also holds
the tokenizer fingerprint, the per-transform counts of the recipe (deduplication, quality
filter) and the recipe itself. `TokenStore.open` refuses, naming the file, before anything is
compiled: a manifest missing or incomplete, a `file` entry that is absolute, holds `..` or
resolves outside the store (a symbolic link), a shard missing or not the size the manifest
says, and on gs:// a shard whose object crc32c (from the same listing that gives the sizes:
no extra read) is not the one recorded when it was written. Local shards are checked when
first read: each shard's crc32c (5.6 GB/s here, sha256 1.1 GB/s) is computed once per
process before any of its tokens are used, so one flipped bit stops the run in one line
naming the shard instead of training or evaluating on it (benchmarks/README.md: the cost).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import google_crc32c  # ships with google-cloud-storage; the C implementation
import numpy as np
from etils import epath

from gpt_jax import storage
from gpt_jax.config import ConfigError
from gpt_jax.tokenizer import Tokenizer, load_tokenizer
from gpt_jax.workdir import atomic_write_bytes

FORMAT = "gpt_jax.token_store"
VERSION = 1
MANIFEST = "manifest.json"
HASH_CHUNK = 16 << 20  # bytes read at a time when a local shard is checked


class StoreError(ConfigError):
    """A store whose files fail their checks: a shard whose bytes are not the ones written, or
    a manifest `file` entry outside the store. A ConfigError: one line, exit 2."""


def crc32c(data: bytes) -> str:
    """base64 of the big-endian CRC32C: the form of a Cloud Storage object's `crc32c`."""
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def file_crc32c(path: str) -> str:
    """`crc32c` of a local file's bytes, read in HASH_CHUNK pieces."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def shard_file(source: str, split: str, index: int) -> str:
    """The shard's path relative to the store: '<source>/<split>-<index:05d>.bin'."""
    return f"{source}/{split}-{index:05d}.bin"


def write_shard(directory: epath.PathLike, file: str, tokens: np.ndarray) -> dict[str, Any]:
    """Writes one shard atomically (one object upload on gs://); returns its index record."""
    data = np.ascontiguousarray(tokens).astype(tokens.dtype.newbyteorder("<")).tobytes()
    atomic_write_bytes(epath.Path(directory) / file, data)
    return {"file": file, "num_tokens": int(len(tokens)),
            "sha256": hashlib.sha256(data).hexdigest(), "crc32c": crc32c(data)}


class ShardWriter:
    """Cuts a stream of token arrays into `shard_tokens`-sized shards of one split."""

    def __init__(self, directory: epath.PathLike, source: str, split: str, dtype: np.dtype,
                 shard_tokens: int):
        self.directory, self.source, self.split = directory, source, split
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict[str, Any]] = []

    def write(self, tokens: np.ndarray) -> None:
        """Appends tokens; every full shard is written as soon as it is complete."""
        self.pending.append(np.asarray(tokens).astype(self.dtype))
        self.pending_tokens += len(tokens)
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, count: int) -> None:
        flat = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        file = shard_file(self.source, self.split, len(self.shards))
        self.shards.append(write_shard(self.directory, file, flat[:count]))
        self.pending, self.pending_tokens = [flat[count:]], len(flat) - count

    def close(self) -> list[dict[str, Any]]:
        """Writes the last, shorter shard; returns the shard records in order."""
        if self.pending_tokens or not self.shards:
            self._flush(self.pending_tokens)
        return self.shards


def split_record(shards: Sequence[dict[str, Any]], num_docs: int, num_bytes: int
                 ) -> dict[str, Any]:
    """A split's manifest entry; `num_bytes` is the UTF-8 size of its documents (no eot)."""
    return {"num_tokens": sum(s["num_tokens"] for s in shards), "num_docs": num_docs,
            "num_bytes": num_bytes, "shards": list(shards)}


def make_manifest(tok: Tokenizer, shard_tokens: int, sources: dict[str, dict[str, Any]],
                  recipe: dict[str, Any]) -> dict[str, Any]:
    """The manifest: `sources` maps each name to {description, splits: {train, val}, counts}."""
    return {
        "format": FORMAT, "version": VERSION,
        "dtype": token_dtype(tok.vocab_size).name, "shard_tokens": shard_tokens,
        "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint, "file": tok.file_name,
                      "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "sources": sources,
        "recipe": recipe,
    }


def write_manifest(directory: epath.PathLike, manifest: dict[str, Any]) -> None:
    """The last write of a store: from here on it reads as complete."""
    atomic_write_bytes(epath.Path(directory) / MANIFEST,
                       json.dumps(manifest, indent=1, sort_keys=True).encode())


def _fs(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a remote path such as gs://bucket/store."""
    import fsspec
    return fsspec.core.url_to_fs(path)


def _listing(directory: epath.Path) -> dict[str, tuple[int, str | None]]:
    """File name -> (size, crc32c on gs://, else None) of one directory, from one listing
    (not one request per shard)."""
    path = os.fspath(directory)
    if "://" not in path:
        if not os.path.isdir(path):
            return {}
        return {e.name: (e.stat().st_size, None) for e in os.scandir(path) if e.is_file()}
    fs, inner = _fs(path)
    try:
        entries = fs.ls(inner, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (int(e["size"]), e.get("crc32c"))
            for e in entries if e.get("type") == "file"}


def outside_problem(root: epath.Path, file: Any) -> str | None:
    """Why a manifest's `file` entry does not name a file inside the store at `root`, or None:
    not a relative path, absolute, holding `..`, or (locally) resolving outside `root`."""
    if not isinstance(file, str) or not file or "\0" in file:
        return "is not a relative path"
    if file.startswith("/") or "://" in file:
        return "is an absolute path"
    if ".." in file.split("/"):
        return "holds '..'"
    base = os.fspath(root)
    if "://" not in base:
        real = os.path.realpath(base)
        if os.path.commonpath([real, os.path.realpath(os.path.join(base, file))]) != real:
            return "resolves outside the store (a symbolic link)"
    return None


class ShardVerifier:
    """Checks each local shard's bytes against its manifest record once per process (crc32c,
    or sha256 for a store written before crc32c was recorded), before its tokens are used.
    Thread-safe: prefetch threads reading different shards hash them in parallel."""

    def __init__(self, root: epath.Path, where: str):
        self.root, self.where = root, where
        self.verified: set[str] = set()
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def check(self, record: dict[str, Any]) -> None:
        """StoreError naming the shard if its bytes are not the ones written."""
        file = record["file"]
        if file in self.verified:
            return
        with self._lock:
            lock = self._locks.setdefault(file, threading.Lock())
        with lock:
            if file in self.verified:
                return
            path = os.fspath(self.root / file)
            kind = "crc32c" if "crc32c" in record else "sha256"
            if kind in record:
                have = file_crc32c(path) if kind == "crc32c" else file_sha256(path)
                if have != record[kind]:
                    raise StoreError(
                        f"{self.where}: shard {path} is damaged: its {kind} is {have}, not "
                        f"the {record[kind]} recorded when it was written; rerun `python -m "
                        "gpt_jax.prepare` into the store (or restore the shard)")
            self.verified.add(file)


class ShardedTokens:
    """One split of one source: a read-only token array spread over shards.

    Reads by random access: from local memmaps, or for `gs://` ranged GETs issued together
    by tensorstore's kvstore (its C++ client, the one orbax uses, runs them concurrently).
    `windows(starts, length)` is what batches use; slicing and `np.asarray` read ranges or
    the whole split.
    """

    def __init__(self, root: epath.Path, shards: Sequence[dict[str, Any]], dtype: np.dtype,
                 shard_tokens: int, verifier: ShardVerifier | None = None):
        self.root, self.shards = root, list(shards)
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.num_tokens = sum(s["num_tokens"] for s in shards)
        self.remote = "://" in os.fspath(root)
        self.verifier = verifier  # local shards: checked on first read (gs://: at open)

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def shape(self) -> tuple[int]:
        return (self.num_tokens,)

    @functools.cached_property
    def _memmaps(self) -> list[np.ndarray]:
        return [np.memmap(os.fspath(self.root / s["file"]), dtype=self.dtype, mode="r",
                          shape=(s["num_tokens"],)) if s["num_tokens"] else
                np.zeros(0, self.dtype) for s in self.shards]

    @functools.cached_property
    def _kvstore(self) -> Any:
        import tensorstore as ts
        # tensorstore retries a failed request a few times (about 7 s); beyond that,
        # read_ranges retries for train.storage_retry_budget_s (storage.retry), so that
        # budget, not tensorstore's (by default 32 retries up to 32 s apart), is the limit.
        context = ts.Context({"gcs_request_retries": {"max_retries": 3, "initial_delay": "1s",
                                                      "max_delay": "4s"}})
        return ts.KvStore.open(os.fspath(self.root).rstrip("/") + "/", context=context).result()

    def _value(self, result: Any, file: str) -> np.ndarray:
        if result.state != "value":
            raise FileNotFoundError(f"{self.root / file}: shard vanished from the store")
        return np.frombuffer(result.value, dtype=self.dtype)

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, begin, end) ranges covering tokens [start, stop)."""
        while start < stop:
            shard, offset = divmod(start, self.shard_tokens)
            end = min(offset + stop - start, self.shards[shard]["num_tokens"])
            yield shard, offset, end
            start += end - offset

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """The tokens of each [start, stop) range, in the store's dtype."""
        for start, stop in ranges:
            if not 0 <= start <= stop <= self.num_tokens:
                raise IndexError(f"tokens [{start}, {stop}) outside [0, {self.num_tokens})")
        pieces = [list(self._pieces(a, b)) for a, b in ranges]
        if not self.remote:
            if self.verifier is not None:
                for shard in {s for p in pieces for s, _, _ in p}:
                    self.verifier.check(self.shards[shard])
            maps = self._memmaps
            return [np.concatenate([maps[s][a:b] for s, a, b in p]) if len(p) != 1
                    else np.array(maps[p[0][0]][p[0][1]:p[0][2]]) for p in pieces]
        flat = [piece for p in pieces for piece in p]
        what = (f"token read of {self.root / self.shards[flat[0][0]]['file']}" if flat
                else f"token read of {self.root}")
        # An outage (refused or unanswered requests, which tensorstore itself retries for
        # about a minute) is retried for train.storage_retry_budget_s, with one line when
        # the reads stall and one when they resume (storage.retry).
        values = storage.retry(lambda: self._read_remote(flat), what)
        arrays = iter(values)
        return [np.concatenate([next(arrays) for _ in p]) if p else np.zeros(0, self.dtype)
                for p in pieces]

    def _read_remote(self, flat: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        import tensorstore as ts
        size = self.dtype.itemsize
        with ts.Batch() as batch:  # issued together, concurrently, by tensorstore's C++ client
            futures = [self._kvstore.read(self.shards[s]["file"], batch=batch,
                                          byte_range=slice(a * size, b * size))
                       for s, a, b in flat]
        return [self._value(f.result(), self.shards[s]["file"])
                for f, (s, _, _) in zip(futures, flat)]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] array: row i is tokens[starts[i] : starts[i] + length]."""
        rows = self.read_ranges([(int(s), int(s) + length) for s in starts])
        return np.stack(rows) if rows else np.zeros((0, length), self.dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.num_tokens)
            return self.read_ranges([(start, max(start, stop))])[0][::step]
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self.num_tokens if index < 0 else 0)
            return self.read_ranges([(i, i + 1)])[0][0]
        raise TypeError(f"ShardedTokens takes an int or a slice, not {type(index).__name__}")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


@dataclasses.dataclass
class TokenStore:
    """A complete, checked store: its manifest, and its splits as `ShardedTokens`.
    With `verify` (the default) every local shard is checked on its first read."""

    path: epath.Path
    manifest: dict[str, Any]
    verify: bool = True
    where: str = "data.store"

    @functools.cached_property
    def verifier(self) -> ShardVerifier | None:
        """One per store, shared by its splits' readers, so each shard is hashed once."""
        return ShardVerifier(self.path, self.where) if self.verify else None

    @classmethod
    def open(cls, path: epath.PathLike, field: str = "data.store", verify: bool = True
             ) -> TokenStore:
        """Opens and checks a store; ConfigError naming `field` and the file if it is not
        complete (manifest missing or of another format, a shard missing or of the wrong size)
        or not safe (a `file` entry outside the store, a gs:// shard whose crc32c differs)."""
        root = epath.Path(path)
        where = f"{field}={os.fspath(path)!r}"
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{where}: {root / MANIFEST} does not exist, so the store is incomplete (a "
                "preparation still running or killed) or not a store; rerun `python -m "
                "gpt_jax.prepare` into it") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: {root / MANIFEST} is not JSON ({e.msg})") from None
        problem = _manifest_problem(manifest)
        if problem:
            raise ConfigError(f"{where}: {root / MANIFEST} {problem}; rerun `python -m "
                              "gpt_jax.prepare` into it")
        _check_inside(root, manifest, where)
        size = np.dtype(manifest["dtype"]).itemsize
        listed: dict[str, dict[str, tuple[int, str | None]]] = {}
        for name, source in manifest["sources"].items():
            for split, record in source["splits"].items():
                for shard in record["shards"]:
                    folder, _, base = shard["file"].rpartition("/")
                    if folder not in listed:
                        listed[folder] = _listing(root / folder)
                    have, crc = listed[folder].get(base, (None, None))
                    want = shard["num_tokens"] * size
                    if verify and crc is not None and "crc32c" in shard and crc != shard["crc32c"]:
                        raise StoreError(
                            f"{where}: shard {root / shard['file']} is damaged: its object's "
                            f"crc32c is {crc}, not the {shard['crc32c']} recorded when it was "
                            "written; rerun `python -m gpt_jax.prepare` into the store")
                    if have != want:
                        raise ConfigError(
                            f"{where}: shard {root / shard['file']} of {name}/{split} is "
                            + ("missing" if have is None else f"{have} bytes, shorter than "
                               if have < want else f"{have} bytes, longer than ")
                            + ("" if have is None else f"the {want} its manifest says")
                            + "; rerun `python -m gpt_jax.prepare` into the store")
        return cls(root, manifest, verify=verify, where=where)

    @property
    def sources(self) -> list[str]:
        return sorted(self.manifest["sources"])

    def split(self, source: str, split: str) -> dict[str, Any]:
        """The manifest record of one split (num_tokens, num_docs, num_bytes, shards)."""
        return self.manifest["sources"][source]["splits"][split]

    def tokens(self, source: str, split: str) -> ShardedTokens:
        return ShardedTokens(self.path, self.split(source, split)["shards"],
                             np.dtype(self.manifest["dtype"]), self.manifest["shard_tokens"],
                             self.verifier)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer saved with the store (checked against its fingerprint)."""
        t = self.manifest["tokenizer"]
        tok = load_tokenizer(os.fspath(self.path / t["file"]))
        if tok.fingerprint != t["fingerprint"]:
            raise ConfigError(f"{self.path / t['file']}: tokenizer fingerprint "
                              f"{tok.fingerprint}, but {self.path / MANIFEST} says "
                              f"{t['fingerprint']}")
        return tok


def _check_inside(root: epath.Path, manifest: dict[str, Any], where: str) -> None:
    """StoreError naming the entry if a shard or the tokenizer `file` lies outside the store."""
    tokenizer_file = manifest["tokenizer"].get("file")  # None: a store made without one
    entries = ([("the tokenizer", tokenizer_file)] if tokenizer_file is not None else []) + [
        (f"shard of {name}/{split}", shard.get("file"))
        for name, source in manifest["sources"].items()
        for split, record in source["splits"].items() for shard in record["shards"]]
    for what, file in entries:
        problem = outside_problem(root, file)
        if problem:
            raise StoreError(f"{where}: {root / MANIFEST} names {what} file {file!r}, which "
                             f"{problem}; a store's files must lie inside it, refused")


def _manifest_problem(manifest: Any) -> str | None:
    """Why a parsed manifest is not one of a complete store, or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"is not a {FORMAT} manifest"
    if manifest.get("version") != VERSION:
        return f"has version {manifest.get('version')}, this reader reads {VERSION}"
    for key in ("dtype", "shard_tokens", "tokenizer", "sources"):
        if key not in manifest:
            return f"has no {key!r}"
    if not manifest["sources"]:
        return "lists no sources"
    for name, source in manifest["sources"].items():
        for split in ("train", "val"):
            if split not in source.get("splits", {}):
                return f"has no {split!r} split for source {name!r}"
    return None
