"""Exact and MinHash-LSH fuzzy dedup (GPT-3 Appendix A) on a planted synthetic corpus: the
Beam transforms against the in-memory reference, recall and precision of the defaults."""

from __future__ import annotations

import apache_beam as beam  # noqa: E402
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from gpt_jax.data import dedup  # noqa: E402


def planted_corpus(seed=0, n_docs=150, n_words=120, n_near=40, n_exact=5, n_related=10):
    """(docs, planted duplicate keys). Originals `doc*` are Zipf-distributed words; `near*`
    copy one with 3-5% of the words substituted (even j) or a sentence appended (odd j);
    `same*` differ only in case and whitespace; `rel*` (not duplicates) share half of an
    original's words in one run, a hard negative for the exact Jaccard check."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(2000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()

    def text(n):
        return " ".join(rng.choice(vocab, n, p=p))

    docs = {f"doc{i:04d}": text(n_words) for i in range(n_docs)}
    planted = set()
    for j in range(n_near):
        src = docs[f"doc{rng.integers(n_docs):04d}"].split()
        if j % 2 == 0:
            k = max(1, round(len(src) * rng.uniform(0.03, 0.05)))
            for pos in rng.choice(len(src), k, replace=False):
                src[pos] = vocab[rng.integers(len(vocab))]
            new = " ".join(src)
        else:
            new = " ".join(src) + ". " + text(int(rng.integers(10, 20))) + "."
        docs[f"near{j:04d}"] = new
        planted.add(f"near{j:04d}")
    for j in range(n_exact):
        src = docs[f"doc{rng.integers(n_docs):04d}"]
        docs[f"same{j:04d}"] = "  " + src.upper().replace(" ", " \n\t ") + " "
        planted.add(f"same{j:04d}")
    for j in range(n_related):
        src = docs[f"doc{rng.integers(n_docs):04d}"].split()
        docs[f"rel{j:04d}"] = " ".join(src[: n_words // 2]) + " " + text(n_words // 2)
    return docs, planted


@pytest.fixture(scope="module")
def corpus():
    return planted_corpus()


def recall_precision(found, planted):
    hit = len(found & planted)
    return hit / len(planted), hit / max(len(found), 1)


def test_helpers():
    assert dedup.normalize("  Héllo\u00a0\tWORLD \n") == "héllo world"
    assert dedup.exact_key("a  B") == dedup.exact_key("A b\n")
    assert dedup.words("It's a Test-case, 42!") == ["it", "s", "a", "test", "case", "42"]
    assert dedup.shingles("a b c", 2) == {"a b", "b c"}
    assert dedup.shingles("a b", 5) == {"a b"}
    assert dedup.shingles(" ,. ", 5) == set()
    assert dedup.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    sig = dedup.signature({"a b", "b c"}, 10, 0)
    assert sig.dtype == np.uint64 and sig.shape == (10,)
    np.testing.assert_array_equal(sig, dedup.signature({"b c", "a b"}, 10, 0))
    assert not np.array_equal(sig, dedup.signature({"a b", "b c"}, 10, 1))
    keys = dedup.band_keys(np.zeros(10, np.uint64), 5, 2)
    assert len(keys) == 5 and len(set(keys)) == 5  # equal rows, distinct bands


def test_find_duplicates_recall_precision(corpus):
    """GPT-3's 10 hashes (10 bands of 1 row) with the default exact-Jaccard threshold; also
    20 bands of 5 rows over 100 permutations."""
    docs, planted = corpus
    found = dedup.find_duplicates(docs)
    recall, precision = recall_precision(found, planted)
    print(f"\nfind_duplicates defaults (10x1): recall {recall:.3f} precision {precision:.3f}"
          f" ({len(found)} found, {len(planted)} planted, {len(docs)} docs)")
    assert recall >= 0.9 and precision >= 0.95
    found20 = dedup.find_duplicates(docs, num_perm=100, bands=20, rows=5)
    r20, p20 = recall_precision(found20, planted)
    print(f"find_duplicates 20x5 of 100: recall {r20:.3f} precision {p20:.3f}")
    assert r20 >= 0.9 and p20 >= 0.95
    strict = dedup.find_duplicates(docs, threshold=0.8)
    print("threshold 0.8: recall {:.3f} precision {:.3f}".format(
        *recall_precision(strict, planted)))
    # a bucket limit below every bucket's size finds nothing
    assert dedup.find_duplicates(docs, max_bucket=1) == set()


def test_fuzzy_dedup_beam_matches_in_memory(corpus):
    docs, planted = corpus
    expected_dups = dedup.find_duplicates(docs)
    kept = [(k, t) for k, t in docs.items() if k not in expected_dups]
    p = BeamPipeline()
    out = (p | beam.Create(sorted(docs.items())) | "Fuzzy" >> dedup.FuzzyDedup())
    assert_that(out, equal_to(kept))
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query()["counters"]
                if c.key.metric.namespace == dedup.NAMESPACE}
    assert counters["fuzzy_docs_in"] == len(docs)
    assert counters["fuzzy_duplicates"] == len(expected_dups)
    # texts go back only to the candidate buckets: each distinct member set of a band bucket
    # of 2..max_bucket documents, once
    buckets: dict[bytes, set] = {}
    for key, text in docs.items():
        sig = dedup.signature(dedup.shingles(text, 5), 10, 0)
        for band in dedup.band_keys(sig, 10, 1):
            buckets.setdefault(band, set()).add(key)
    candidates = {frozenset(m) for m in buckets.values() if 2 <= len(m) <= 1000}
    assert counters["fuzzy_candidate_texts"] == sum(len(m) for m in candidates)
    assert counters["fuzzy_candidate_texts"] < len(docs)  # here: fewer than one per document
    recall, precision = recall_precision(set(docs) - {k for k, _ in kept}, planted)
    print(f"\nFuzzyDedup (Beam): recall {recall:.3f} precision {precision:.3f}")
    assert recall >= 0.9 and precision >= 0.95


def test_fuzzy_dedup_shuffles_keys_not_shingles(corpus):
    """The bands leave as (band key, doc key): their bytes per document do not grow with the
    document, where (band key, (doc key, shingle set)) per band grew with shingles x bands
    (34.7 bytes per byte of text on the web corpus of benchmarks/prepare_scale.py)."""
    coder = beam.coders.FastPrimitivesCoder()  # what Beam encodes untyped elements with

    def band_bytes(doc, **kw):
        params = dict(ngram=5, num_perm=10, bands=10, rows=1, seed=0) | kw
        out = dedup._to_bands(doc, **params)
        assert len(out) == params["bands"]
        assert all(isinstance(b, bytes) and len(b) == 2 + 8 * params["rows"] and k == doc[0]
                   for b, k in out)
        return sum(len(coder.encode(e)) for e in out)

    key = f"{7:020d}:train"
    short, long = " ".join(f"w{i}" for i in range(6)), " ".join(f"w{i}" for i in range(20_000))
    assert band_bytes((key, short)) == band_bytes((key, long)) <= 10 * (2 + 8 + len(key) + 8)
    assert band_bytes((key, short), num_perm=100, bands=20, rows=5) == band_bytes(
        (key, long), num_perm=100, bands=20, rows=5) <= 20 * (2 + 40 + len(key) + 8)
    docs, _ = corpus
    text_bytes = sum(len(t.encode()) for t in docs.values())
    new = sum(band_bytes(doc) for doc in docs.items())
    old = sum(len(coder.encode((b, (k, frozenset(dedup.shingles(t, 5))))))
              for k, t in docs.items()
              for b in dedup.band_keys(dedup.signature(dedup.shingles(t, 5), 10, 0), 10, 1))
    print(f"\nband elements per byte of text: {new / text_bytes:.2f} (shingle sets per band: "
          f"{old / text_bytes:.1f})")
    assert new < text_bytes and old > 20 * new


def test_fuzzy_dedup_skips_large_buckets():
    docs = {f"k{i}": "the same text here" for i in range(4)}
    assert dedup.find_duplicates(docs) == {"k1", "k2", "k3"}
    p = BeamPipeline()
    out = p | beam.Create(sorted(docs.items())) | dedup.FuzzyDedup(max_bucket=3)
    assert_that(out, equal_to(sorted(docs.items())))
    result = p.run()
    result.wait_until_finish()
    skipped = [c.committed for c in result.metrics().query()["counters"]
               if c.key.metric.name == "fuzzy_buckets_skipped"]
    assert skipped == [10]


def test_exact_dedup():
    docs = [("b", "Hello  World"), ("a", "hello world\n"), ("c", "HELLO\tworld"),
            ("d", "something else"), ("e", "Something   ELSE"), ("f", "unique")]
    p = BeamPipeline()
    out = p | beam.Create(docs) | dedup.ExactDedup()
    assert_that(out, equal_to([("a", "hello world\n"), ("d", "something else"),
                               ("f", "unique")]))
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
                if c.key.metric.namespace == dedup.NAMESPACE}
    assert counters == {"exact_docs_in": 6, "exact_duplicates": 3}


def test_bands_rows_must_fit_num_perm():
    with pytest.raises(ValueError, match=r"data\.dedup\.bands.*data\.dedup\.rows.*num_perm"):
        dedup.FuzzyDedup(num_perm=10, bands=5, rows=3)
    with pytest.raises(ValueError, match="data.dedup.num_perm"):
        dedup.find_duplicates({}, num_perm=10, bands=20, rows=1)
