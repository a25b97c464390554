"""GPT-3's quality filter (Appendix A): the hashed-feature logistic regression on two small
generated corpora, the Pareto keep rule against its closed form and numpy's own draws, and
the Beam transform against the in-memory rule."""

from __future__ import annotations

import apache_beam as beam  # noqa: E402
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from gpt_jax.data import quality  # noqa: E402

NOUNS = ("model river city teacher garden letter engine country history music window "
         "problem answer season village market doctor island theory language").split()
ADJS = "small ancient quiet famous bright careful early modern simple northern".split()
VERBS = "describes follows changes reaches supports explains visits opens builds finds".split()
PREPS = "near beyond under before after across inside".split()
JUNK = ("click here login signup cookie cart free download http www com html menu home "
        "share subscribe ad privacy terms 404 best cheap sale buy now").split()


def reference_doc(rng):
    """English-ish prose: a few well-formed sentences."""
    def sentence():
        c = lambda seq: seq[rng.integers(len(seq))]  # noqa: E731
        return (f"The {c(ADJS)} {c(NOUNS)} {c(VERBS)} the {c(NOUNS)} {c(PREPS)} the "
                f"{c(ADJS)} {c(NOUNS)}.")
    return " ".join(sentence() for _ in range(rng.integers(2, 6)))


def raw_doc(rng):
    """Crawl-like junk: menu words, random tokens, numbers, a few prose nouns."""
    out = []
    for _ in range(rng.integers(10, 40)):
        kind = rng.integers(4)
        if kind == 0:
            out.append(JUNK[rng.integers(len(JUNK))])
        elif kind == 1:
            out.append("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), 6)))
        elif kind == 2:
            out.append(str(rng.integers(10000)))
        else:
            out.append(NOUNS[rng.integers(len(NOUNS))])
    return " | ".join(out)


@pytest.fixture(scope="module")
def classifier():
    rng = np.random.default_rng(0)
    ref = [reference_doc(rng) for _ in range(300)]
    raw = [raw_doc(rng) for _ in range(300)]
    return quality.QualityClassifier.train(ref, raw, num_features_log2=14, seed=0)


def test_classifier_separates_and_round_trips(classifier, tmp_path):
    print(f"\nheld-out accuracy {classifier.heldout_accuracy:.3f}")
    assert classifier.heldout_accuracy >= 0.95
    rng = np.random.default_rng(1)
    texts = [reference_doc(rng), raw_doc(rng)]
    scores = classifier.score(texts)
    assert scores.shape == (2,) and 0 <= scores.min() and scores.max() <= 1
    assert scores[0] > 0.5 > scores[1]
    path = tmp_path / "sub" / "quality.pkl"
    classifier.save(path)
    loaded = quality.load(path)
    assert loaded.heldout_accuracy == classifier.heldout_accuracy
    np.testing.assert_array_equal(loaded.score(texts), scores)
    assert classifier.score([]).shape == (0,)
    # scikit-learn's cached id(stop_words), a memory address, would make each launch's
    # classifier.pkl (part of the store) differ; it is left out of the pickle
    assert b"_stop_words_id" not in path.read_bytes()


@pytest.mark.parametrize("score", [0.2, 0.5, 0.9])
def test_keep_follows_pareto_rule(score):
    """numpy's pareto is Lomax: P(X > 1 - s) = (2 - s)^-9 (0.0050, 0.026, 0.424)."""
    n = 20_000
    kept = np.mean([quality.keep(score, f"doc-{i}") for i in range(n)])
    closed = quality.keep_probability(score, 9.0)
    monte_carlo = np.mean(np.random.default_rng(123).pareto(9.0, 400_000) > 1 - score)
    print(f"\ns={score}: kept {kept:.4f} closed form {closed:.4f} np.random.pareto "
          f"{monte_carlo:.4f}")
    assert abs(kept - closed) < 0.01
    assert abs(monte_carlo - closed) < 0.003
    assert abs(kept - monte_carlo) < 0.01


def test_keep_is_deterministic_per_document():
    keys = [f"k{i}" for i in range(200)]
    a = [quality.keep(0.9, k) for k in keys]
    assert a == [quality.keep(0.9, k) for k in keys]
    assert a != [quality.keep(0.9, k, seed=1) for k in keys]
    assert quality.keep_probability(1.0) == 1.0 and all(quality.keep(1.0, k) for k in keys)


def test_quality_filter_beam_matches_keep(classifier, tmp_path):
    rng = np.random.default_rng(2)
    docs = [(f"d{i:03d}", reference_doc(rng) if i % 2 else raw_doc(rng)) for i in range(300)]
    path = tmp_path / "quality.pkl"
    classifier.save(path)
    scores = classifier.score([t for _, t in docs])
    expected = [d for d, s in zip(docs, scores) if quality.keep(float(s), d[0])]
    assert 0 < len(expected) < len(docs)
    p = BeamPipeline()
    out = p | beam.Create(docs) | quality.QualityFilter(str(path))
    assert_that(out, equal_to(expected))
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query()
    counters = {c.key.metric.name: c.committed for c in metrics["counters"]
                if c.key.metric.namespace == quality.NAMESPACE}
    assert counters == {"docs_in": len(docs), "docs_kept": len(expected)}
    (dist,) = [d.committed for d in metrics["distributions"]
               if d.key.metric.namespace == quality.NAMESPACE]
    assert dist.count == len(docs)
    assert dist.sum == sum(int(round(1000 * float(s))) for s in scores)
    print(f"\nQualityFilter kept {len(expected)}/{len(docs)}")
