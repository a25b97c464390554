"""GPT-3's quality filter (Appendix A): a logistic-regression classifier on hashed word
features tells a curated reference corpus (WebText, Wikipedia, books; label 1) from raw
Common Crawl (label 0), and a raw document with score s is kept iff
`np.random.pareto(alpha) > 1 - s`, alpha = 9: mostly high scores, a few low ones for
diversity. The paper used Spark's Tokenizer + HashingTF; here scikit-learn's
`HashingVectorizer` (word tokens, lowercase, no sign flip, L2 norm) + `LogisticRegression`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from etils import epath

NAMESPACE = "gpt_jax.quality"
TOKEN_PATTERN = r"(?u)\b\w+\b"  # every word, single characters included


class QualityClassifier:
    """P(reference | text) from hashed word counts; picklable, saved as pickle bytes.

    `heldout_accuracy`: accuracy on the seeded 20% that `train` held out.
    """

    def __init__(self, vectorizer: Any, model: Any, heldout_accuracy: float = float("nan")):
        """`vectorizer`: a scikit-learn HashingVectorizer; `model`: its LogisticRegression."""
        self.vectorizer, self.model, self.heldout_accuracy = vectorizer, model, heldout_accuracy

    @classmethod
    def train(cls, reference_docs: Sequence[str], raw_docs: Sequence[str], *,
              num_features_log2: int = 18, seed: int = 0) -> QualityClassifier:
        """Fits on 80% of the documents (seeded split), reports accuracy on the other 20%."""
        # Imported on use: only the quality filter needs scikit-learn, so workers of a recipe
        # without it need not install it (unpickling a classifier imports it there).
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression

        vectorizer = HashingVectorizer(n_features=2**num_features_log2, alternate_sign=False,
                                       norm="l2", lowercase=True, token_pattern=TOKEN_PATTERN)
        texts = list(reference_docs) + list(raw_docs)
        labels = np.r_[np.ones(len(reference_docs)), np.zeros(len(raw_docs))].astype(int)
        order = np.random.default_rng(seed).permutation(len(texts))
        n_test = len(texts) // 5
        test, fit = order[:n_test], order[n_test:]
        x = vectorizer.transform(texts)
        model = LogisticRegression(max_iter=1000, random_state=seed)
        model.fit(x[fit], labels[fit])
        acc = float(model.score(x[test], labels[test])) if n_test else float("nan")
        return cls(vectorizer, model, acc)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Probability that each text is reference-quality, in [0, 1]."""
        if not len(texts):
            return np.zeros(0)
        x = self.vectorizer.transform(list(texts))
        return self.model.predict_proba(x)[:, list(self.model.classes_).index(1)]

    def __getstate__(self) -> dict:
        """The pickled state, without what makes two pickles of one classifier differ:
        scikit-learn caches `id(stop_words)` (a memory address) on the vectorizer once it
        has transformed text, and a store must be byte-identical across launches."""
        state = dict(self.__dict__)
        vectorizer = copy.copy(self.vectorizer)
        vectorizer.__dict__.pop("_stop_words_id", None)  # recomputed on the next transform
        state["vectorizer"] = vectorizer
        return state

    def save(self, path: str | os.PathLike) -> None:
        """Writes pickle bytes to `path` (local or gs://), atomically."""
        from gpt_jax.workdir import atomic_write_bytes
        atomic_write_bytes(path, pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityClassifier:
        """Reads a `save`d classifier (a pickle: load only files you wrote)."""
        obj = pickle.loads(epath.Path(path).read_bytes())
        if not isinstance(obj, cls):
            raise TypeError(f"{path} holds a {type(obj).__name__}, not a QualityClassifier")
        return obj


def load(path: str | os.PathLike) -> QualityClassifier:
    """`QualityClassifier.load(path)`."""
    return QualityClassifier.load(path)


def doc_seed(doc_key: str) -> int:
    """A stable 64-bit integer from sha1(doc_key): the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(doc_key.encode("utf-8")).digest()[:8], "little")


def keep(score: float, doc_key: str, *, alpha: float = 9.0, seed: int = 0) -> bool:
    """GPT-3's rule `np.random.pareto(alpha) > 1 - score`, the draw seeded by (seed,
    doc_key), so every runner, worker and rerun keeps the same documents."""
    rng = np.random.default_rng([seed, doc_seed(doc_key)])
    return bool(rng.pareto(alpha) > 1.0 - score)


def keep_probability(score: float, alpha: float = 9.0) -> float:
    """P(keep) = P(X > 1 - s) = (2 - s)^-alpha for s in [0, 1].

    numpy's `pareto(a)` samples the Lomax (Pareto II) distribution, support [0, inf),
    P(X > x) = (1 + x)^-a (a classical Pareto minus 1). With alpha = 9: s = 1 -> 1,
    s = 0.9 -> 0.424, s = 0.5 -> 0.026, s = 0.2 -> 0.0050, s = 0 -> 0.0020.
    """
    x = 1.0 - float(score)
    return 1.0 if x < 0 else float((1.0 + x) ** -alpha)


class _ScoreAndKeep(beam.DoFn):
    """Scores a batch of (doc_key, text) with the classifier loaded once per worker."""

    def __init__(self, classifier_path: str, alpha: float, seed: int):
        self.classifier_path, self.alpha, self.seed = classifier_path, alpha, seed
        self.classifier: QualityClassifier | None = None
        self.docs_in = beam.metrics.Metrics.counter(NAMESPACE, "docs_in")
        self.docs_kept = beam.metrics.Metrics.counter(NAMESPACE, "docs_kept")
        self.scores = beam.metrics.Metrics.distribution(NAMESPACE, "score_per_mille")

    def setup(self) -> None:
        self.classifier = load(self.classifier_path)

    def process(self, batch: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        scores = self.classifier.score([text for _, text in batch])
        self.docs_in.inc(len(batch))
        for (key, text), s in zip(batch, scores):
            self.scores.update(int(round(1000 * float(s))))
            if keep(float(s), key, alpha=self.alpha, seed=self.seed):
                self.docs_kept.inc()
                yield key, text


class QualityFilter(beam.PTransform):
    """(doc_key, text) -> the kept (doc_key, text), by `keep(classifier score, doc_key)`.

    Counters `docs_in`, `docs_kept` and the distribution `score_per_mille` (score x 1000,
    rounded) in namespace 'gpt_jax.quality'. Documents are scored in batches of <= 256.
    """

    def __init__(self, classifier_path: str | os.PathLike, alpha: float = 9.0, seed: int = 0):
        super().__init__()
        self.classifier_path, self.alpha, self.seed = os.fspath(classifier_path), alpha, seed

    def expand(self, docs: beam.PCollection) -> beam.PCollection:
        return (docs
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=256)
                | "ScoreAndKeep" >> beam.ParDo(
                    _ScoreAndKeep(self.classifier_path, self.alpha, self.seed)))
