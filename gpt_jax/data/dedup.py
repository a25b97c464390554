"""Exact and fuzzy (MinHash LSH) document deduplication, in memory and as Beam transforms.

GPT-3 (Appendix A) deduplicated each dataset with Spark's MinHashLSH, 10 hashes, on the
classifier's features (Tokenizer + HashingTF: a document's set of words). Spark's semantics,
followed here: each of the `numHashTables` tables is ONE min-hash, so a pair becomes a
candidate when it agrees on any one of them (b = 10 bands of r = 1 row), and
`approxSimilarityJoin` then keeps the candidates whose EXACT Jaccard distance is below its
threshold. Here the features are word `ngram`-shingles (`ngram=1` is the paper's bag of
words); `bands` x `rows` <= `num_perm` min-hashes (datasketch `MinHash`, scheme affine64)
generalise Spark's tables, so e.g. 20 bands of 5 rows of 100 permutations trade recall of
low-similarity pairs for much smaller buckets.

A pair with shingle Jaccard s shares a bucket with probability 1 - (1 - s^r)^b (r = 1,
b = 10: s = 0.3 -> 0.97, s = 0.5 -> 0.999), and is then a duplicate iff its exact Jaccard is
>= `threshold`. So `threshold` alone decides what "near-duplicate" means, the bands only how
many true pairs are ever compared. The paper gives no threshold; the default 0.5 is measured
(tests/test_dedup.py): substituting 3-5% of a 120-word text's words leaves a 5-gram Jaccard
of 0.59-0.72 (0.8 catches none of them), while two texts sharing half their words in one
run score 0.32. In a bucket, every document whose exact Jaccard with some document of
SMALLER key is >= `threshold` is a duplicate (pairwise, not transitive: in a chain A~B~C with
A !~ C, B and C both go). The smallest key of a cluster is always kept, whatever order a
runner delivers elements in.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import numpy as np

NAMESPACE = "gpt_jax.dedup"
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, lowercase, whitespace runs collapsed to one space, stripped (exact dedup)."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def exact_key(text: str) -> str:
    """sha1 hex digest of `normalize(text)`."""
    return hashlib.sha1(normalize(text).encode("utf-8")).hexdigest()


def words(text: str) -> list[str]:
    """Lowercased runs of word characters (like Spark's Tokenizer, minus the punctuation)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def shingles(text: str, n: int) -> set[str]:
    """Word n-grams joined by spaces; fewer than n words -> one shingle of all of them."""
    w = words(text)
    if not w:
        return set()
    if len(w) < n:
        return {" ".join(w)}
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


@functools.lru_cache(maxsize=16)
def _template(num_perm: int, seed: int) -> Any:
    # Imported on use: only fuzzy dedup needs datasketch, so workers of a recipe without it
    # need not install it (data.workers stages it only when data.dedup.fuzzy is on).
    from datasketch import MinHash
    return MinHash(num_perm=num_perm, seed=seed, scheme="affine64")


def signature(shingle_set: Iterable[str], num_perm: int, seed: int) -> np.ndarray:
    """The uint64 min-hash values of a shingle set (datasketch MinHash, affine64)."""
    m = _template(num_perm, seed).copy()
    items = sorted(shingle_set)
    if items:
        m.update_batch([s.encode("utf-8") for s in items])
    return np.asarray(m.hashvalues, dtype=np.uint64)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One bucket key per band: the band index (2 bytes) followed by its rows' min-hashes."""
    sig = np.asarray(sig, dtype="<u8")
    return [i.to_bytes(2, "little") + sig[i * rows:(i + 1) * rows].tobytes()
            for i in range(bands)]


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity |a & b| / |a | b| (two empty sets: 1.0)."""
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _check(ngram: int, num_perm: int, bands: int, rows: int, threshold: float) -> None:
    if min(ngram, num_perm, bands, rows) < 1:
        raise ValueError("data.dedup.ngram/num_perm/bands/rows must be >= 1")
    if bands * rows > num_perm:
        raise ValueError(f"data.dedup.bands ({bands}) * data.dedup.rows ({rows}) must be <= "
                         f"data.dedup.num_perm ({num_perm})")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"data.dedup.threshold must be in (0, 1], got {threshold}")


def _bucket_duplicates(members: Iterable[tuple[str, frozenset]],
                       threshold: float) -> list[str]:
    """Keys in one bucket with Jaccard >= threshold to some member of smaller key."""
    members = sorted(dict(members).items())
    dups = []
    for i in range(1, len(members)):
        key, s = members[i]
        if any(jaccard(s, members[j][1]) >= threshold for j in range(i)):
            dups.append(key)
    return dups


def find_duplicates(docs: dict[str, str], *, ngram: int = 5, num_perm: int = 10,
                    bands: int = 10, rows: int = 1, threshold: float = 0.5, seed: int = 0,
                    max_bucket: int | None = 1000) -> set[str]:
    """In-memory `FuzzyDedup`: the keys it removes (same functions, same bucket rule)."""
    _check(ngram, num_perm, bands, rows, threshold)
    buckets: dict[bytes, list[tuple[str, frozenset]]] = {}
    for key, text in docs.items():
        sh = frozenset(shingles(text, ngram))
        for band in band_keys(signature(sh, num_perm, seed), bands, rows):
            buckets.setdefault(band, []).append((key, sh))
    dups: set[str] = set()
    for members in buckets.values():
        if len(members) > 1 and (max_bucket is None or len(members) <= max_bucket):
            dups.update(_bucket_duplicates(members, threshold))
    return dups


# ------------------------------------------------------------------------------ Beam
#
# The shuffle carries keys, not shingles. Each document's signature is computed once, on the
# worker that reads it, and its bands leave as (band key, doc key) only: 2 + 8 * rows bytes
# and the key, whatever the document's length. A bucket of one document ends there. A
# bucket of 2..max_bucket documents names its members once, under the sha1 of its sorted
# member keys (bands with the same members - a near-duplicate pair shares most of its
# bands - collapse into one candidate bucket), and only those documents' texts
# are joined back by doc key and sent to their candidate buckets, where the shingles are
# rebuilt and the exact Jaccard checked as `find_duplicates` does. So a document costs the
# shuffle its text twice (the candidate join and the final drop join) plus its band keys,
# and a candidate document its text once more per distinct candidate bucket, instead of its
# shingle set once per band (issue 28; docs/data_cost.md). The texts travel zlib'd (level
# 1), unpacked where they are read: a few % of the CPU for ~2.6x fewer bytes. With r = 1
# (GPT-3's 10 hashes) on web-like text nearly every document shares some band with another,
# so the candidate texts, at most one zlib'd copy per band, are most of what is shuffled.


def _to_bands(doc: tuple[str, str], ngram: int, num_perm: int, bands: int, rows: int,
              seed: int) -> list[tuple[bytes, str]]:
    """(doc_key, text) -> one (band key, doc_key) per band: keys only."""
    beam.metrics.Metrics.counter(NAMESPACE, "fuzzy_docs_in").inc()
    key, text = doc
    sig = signature(shingles(text, ngram), num_perm, seed)
    return [(b, key) for b in band_keys(sig, bands, rows)]


def _candidate_bucket(bucket: tuple[bytes, Iterable[str]], max_bucket: int | None
                      ) -> list[tuple[str, bytes]]:
    """A band bucket -> (doc_key, candidate bucket id) per member, if it has 2..max_bucket
    distinct members; the id is the sha1 of the sorted member keys (their repr: unambiguous
    whatever characters a key holds)."""
    members = sorted(set(bucket[1]))  # a repeated doc_key counts once, as in `find_duplicates`
    if len(members) < 2:
        return []
    if max_bucket is not None and len(members) > max_bucket:
        beam.metrics.Metrics.counter(NAMESPACE, "fuzzy_buckets_skipped").inc()
        return []
    bucket_id = hashlib.sha1(repr(members).encode("utf-8")).digest()
    return [(key, bucket_id) for key in members]


def _pack(doc: tuple[str, str]) -> tuple[str, bytes]:
    """(doc_key, text) -> (doc_key, zlib'd UTF-8): what the joins ship (web text: ~2.6x
    smaller, at ~80 MB/s; surrogatepass, so any str comes back as it went in)."""
    return doc[0], zlib.compress(doc[1].encode("utf-8", "surrogatepass"), 1)


def _unpack(packed: bytes) -> str:
    return zlib.decompress(packed).decode("utf-8", "surrogatepass")


def _to_candidates(joined: tuple[str, dict]) -> list[tuple[bytes, tuple[str, bytes]]]:
    """A doc_key's packed texts and candidate buckets -> (bucket id, (doc_key, packed)) per
    distinct bucket (none for a document in no candidate bucket)."""
    key, groups = joined
    ids = set(groups["buckets"])
    if not ids:
        return []
    texts = list(groups["docs"])
    beam.metrics.Metrics.counter(NAMESPACE, "fuzzy_candidate_texts").inc(len(ids) * len(texts))
    return [(i, (key, t)) for i in sorted(ids) for t in texts]


def _bucket_dups(bucket: tuple[bytes, Iterable[tuple[str, bytes]]], ngram: int,
                 threshold: float) -> list[str]:
    """A candidate bucket's (doc_key, packed) -> its duplicates, as `find_duplicates` rules."""
    members = {key: frozenset(shingles(_unpack(packed), ngram)) for key, packed in bucket[1]}
    return _bucket_duplicates(members.items(), threshold)


def _with_none(key: str) -> tuple[str, None]:
    return key, None


def _drop_marked(joined: tuple[str, dict], counter: str) -> list[tuple[str, str]]:
    key, groups = joined
    packed = list(groups["docs"])
    if any(True for _ in groups["dups"]):
        beam.metrics.Metrics.counter(NAMESPACE, counter).inc(len(packed))
        return []
    return [(key, _unpack(p)) for p in packed]


class FuzzyDedup(beam.PTransform):
    """(doc_key, text) -> the kept (doc_key, text): MinHash LSH + exact Jaccard check.

    Defaults are GPT-3's 10 hashes (10 bands of 1 row). `threshold` is the exact shingle
    Jaccard similarity at or above which a pair is a duplicate (Spark's join threshold is
    the distance, 1 - similarity). The bands shuffle only keys (see above); a candidate
    bucket costs O(size^2) Jaccard computations and holds its members' texts and shingles
    in one worker's memory, and with r = 1 a boilerplate shingle that is many documents'
    minimum makes one bucket of them all (and empty texts share every bucket); buckets over
    `max_bucket` (None: no limit) are skipped and counted in `fuzzy_buckets_skipped`. Their
    pairs are usually still found through another band, otherwise kept: a bounded loss of
    recall instead of a quadratic straggler. The removed keys are those of
    `find_duplicates` on the same documents and parameters.
    """

    def __init__(self, ngram: int = 5, num_perm: int = 10, bands: int = 10, rows: int = 1,
                 threshold: float = 0.5, seed: int = 0, max_bucket: int | None = 1000):
        super().__init__()
        _check(ngram, num_perm, bands, rows, threshold)
        self.ngram, self.num_perm, self.bands, self.rows = ngram, num_perm, bands, rows
        self.threshold, self.seed, self.max_bucket = threshold, seed, max_bucket

    def expand(self, docs: beam.PCollection) -> beam.PCollection:
        membership = (docs
                      | "Bands" >> beam.FlatMap(_to_bands, self.ngram, self.num_perm,
                                                self.bands, self.rows, self.seed)
                      | "GroupBuckets" >> beam.GroupByKey()
                      | "CandidateBuckets" >> beam.FlatMap(_candidate_bucket, self.max_bucket))
        packed = docs | "Pack" >> beam.Map(_pack)
        dups = ({"docs": packed, "buckets": membership}
                | "JoinCandidates" >> beam.CoGroupByKey()
                | "CandidateTexts" >> beam.FlatMap(_to_candidates)
                | "GroupCandidates" >> beam.GroupByKey()
                | "BucketDups" >> beam.FlatMap(_bucket_dups, self.ngram, self.threshold)
                | "DistinctDups" >> beam.Distinct()
                | "KeyDups" >> beam.Map(_with_none))
        return ({"docs": packed, "dups": dups}
                | "JoinDups" >> beam.CoGroupByKey()
                | "DropDups" >> beam.FlatMap(_drop_marked, "fuzzy_duplicates"))


class _MinDoc(beam.CombineFn):
    """(smallest (doc_key, text), count) of one exact-duplicate group."""

    def create_accumulator(self) -> tuple:
        return (None, 0)

    def add_input(self, acc: tuple, doc: tuple) -> tuple:
        return (doc if acc[0] is None else min(acc[0], doc), acc[1] + 1)

    def merge_accumulators(self, accs: Iterable[tuple]) -> tuple:
        accs = list(accs)
        firsts = [a[0] for a in accs if a[0] is not None]
        return (min(firsts) if firsts else None, sum(a[1] for a in accs))

    def extract_output(self, acc: tuple) -> tuple:
        return acc


def _exact_keyed(doc: tuple[str, str]) -> tuple[str, tuple[str, str]]:
    beam.metrics.Metrics.counter(NAMESPACE, "exact_docs_in").inc()
    return exact_key(doc[1]), (doc[0], doc[1])


def _exact_kept(group: tuple[str, tuple]) -> tuple[str, str]:
    kept, count = group[1]
    beam.metrics.Metrics.counter(NAMESPACE, "exact_duplicates").inc(count - 1)
    return kept


class ExactDedup(beam.PTransform):
    """(doc_key, text) -> one (doc_key, text) per `exact_key`: the smallest doc_key.

    A combiner, so a text repeated millions of times (boilerplate) never sits in one list.
    """

    def expand(self, docs: beam.PCollection) -> beam.PCollection:
        return (docs
                | "ExactKey" >> beam.Map(_exact_keyed)
                | "MinPerKey" >> beam.CombinePerKey(_MinDoc())
                | "Kept" >> beam.Map(_exact_kept))
