"""The corpus a run trains on: a token store, its tokenizer, and the mixture weights.

Two ways to a store, one format (`data.store`) and one reader:
- `data.store` names a store written by `python -m gpt_jax.prepare` (Apache Beam; GPT-3's
  dedup and quality filter; several sources). Training only opens and checks it.
- Otherwise the in-process path tokenizes `data.source` with a `multiprocessing` pool into
  `<data_dir>/tokens/<source>-<key>-<tokenizer>/` (or `data.token_dir`), every non-empty
  document followed by the end-of-text id: the embedded default for small corpora. A store
  that exists and matches the tokenizer is reused; an incomplete one is rebuilt (shards are
  written atomically, the manifest last), unless `data.token_dir` named it: then any mismatch
  is an error, not a rebuild. On `gs://` process 0 writes it and the others wait for it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.config import ConfigError
from gpt_jax.data import batches, encode, sources, store
from gpt_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Corpus:
    """A checked token store, the tokenizer, and each training source's weight."""

    tokenizer: Tokenizer
    store: store.TokenStore
    weights: dict[str, float]  # source -> weight; one source: {name: 1.0}

    @property
    def directory(self) -> str:
        return os.fspath(self.store.path)

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    @property
    def heaviest(self) -> str:
        """The source with the largest weight: the default of the one-source accessors."""
        return max(self.weights, key=self.weights.get)

    def tokens(self, split: str, source: str | None = None) -> store.ShardedTokens:
        """A split of `source` (default: the heaviest source)."""
        return self.store.tokens(source or self.heaviest, split)

    @property
    def train(self) -> store.ShardedTokens:
        return self.tokens("train")

    @property
    def val(self) -> store.ShardedTokens:
        return self.tokens("val")

    @property
    def manifests(self) -> dict[str, dict[str, Any]]:
        """Split -> manifest record (num_tokens, num_docs, num_bytes, shards) of the heaviest
        source, with the store's dtype and tokenizer."""
        name, m = self.heaviest, self.store.manifest
        return {split: dict(self.store.split(name, split), dtype=m["dtype"],
                            tokenizer=m["tokenizer"], source=m["sources"][name]["description"])
                for split in sources.SPLITS}

    def bytes_per_token(self, split: str, source: str | None = None) -> float:
        """UTF-8 bytes per token; bits per byte = loss_nats / ln 2 / bytes_per_token."""
        r = self.store.split(source or self.heaviest, split)
        return r["num_bytes"] / max(r["num_tokens"], 1)

    def batch(self, *, seed: int, step: int, global_batch: int, context: int,
              process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """This process's int32 [B / P, context + 1] windows of training batch `step`."""
        kw = dict(seed=seed, step=step, global_batch=global_batch, context=context,
                  process_index=process_index, process_count=process_count)
        if len(self.weights) == 1:
            return batches.train_batch(self.train, **kw)
        return batches.mixture_batch([self.tokens("train", n) for n in self.names],
                                     list(self.weights.values()), **kw)


def default_token_dir(cfg: ml_collections.ConfigDict, source: sources.Source,
                      tok: Tokenizer) -> str:
    """`<data_dir>/tokens/<source key>-<kind><vocab>-<fingerprint prefix>`."""
    name = f"{source.key}-{tok.kind}{tok.vocab_size}-{tok.fingerprint[:12]}"
    return os.fspath(epath.Path(cfg.data.data_dir) / "tokens" / name)


def check_context(corpus: Corpus, context: int) -> None:
    """ConfigError unless every split of every source holds a window of context + 1 tokens."""
    for name in corpus.names:
        for split in ("val", "train"):
            n = len(corpus.tokens(split, name))
            if n < context + 1:
                of = f" of source {name!r}" if len(corpus.names) > 1 else ""
                raise ConfigError(
                    f"model.context={context} exceeds the {n} tokens of the "
                    f"{sources.SPLIT_NAMES[split]} split{of} (a window needs context + 1 = "
                    f"{context + 1}); use a smaller model.context or more data")


def build_store(directory: str, name: str, source: sources.Source, tok: Tokenizer,
                shard_tokens: int, num_workers: int) -> dict[str, Any]:
    """The in-process path: tokenizes both splits of one source into a store, manifest last."""
    dtype = store.token_dtype(tok.vocab_size)
    splits = {}
    for split in sources.SPLITS:
        writer = store.ShardWriter(directory, name, split, dtype, shard_tokens)
        n_docs = n_bytes = 0
        for tokens, b, n in encode.encode_chunks(tok, source.docs(split), num_workers):
            writer.write(tokens)
            n_bytes, n_docs = n_bytes + b, n_docs + n
        if n_bytes == 0:  # refuse before writing a manifest that reads as complete
            raise ConfigError(_empty_split_message(source, split))
        splits[split] = store.split_record(writer.close(), n_docs, n_bytes)
    counts = {"docs_read": sum(r["num_docs"] for r in splits.values())}
    entry: dict[str, Any] = {"description": source.description, "key": source.key,
                             "splits": splits, "counts": counts}
    skipped = {s: v for s, v in source.skipped.items() if v}
    if skipped:
        entry["skipped_files"] = {s: {"count": len(v), "first": v[:10]}
                                  for s, v in skipped.items()}
    tok.save(directory)
    manifest = store.make_manifest(tok, shard_tokens, {name: entry},
                                   {"made_by": "gpt_jax.data.corpus (in-process)"})
    store.write_manifest(directory, manifest)
    return manifest


def _empty_split_message(source: sources.Source, split: str) -> str:
    bad = source.skipped.get(split, [])
    desc = source.description
    where = f"data.text_glob={desc['glob']!r}" if "glob" in desc else f"data.{desc['source']}"
    return (f"{where}: the {sources.SPLIT_NAMES[split]} split has no text" + (
        f": {len(bad)} files are not UTF-8 (e.g. {', '.join(bad[:3])}), the rest, if any, "
        "are empty" if bad else ": its documents are empty") + "; point it at UTF-8 text files")


def store_tokenizer(cfg: ml_collections.ConfigDict, token_store: store.TokenStore) -> Tokenizer:
    """The store's tokenizer, refused when the config asks for another one."""
    d = cfg.data
    t = token_store.manifest["tokenizer"]
    where = f"data.store={d.store!r}"
    if d.tokenizer != "file" and d.tokenizer != t["kind"]:
        raise ConfigError(f"data.tokenizer={d.tokenizer!r}, but {where} was tokenized with a "
                          f"{t['kind']!r} tokenizer; set data.tokenizer={t['kind']!r}")
    tok = token_store.tokenizer
    if d.tokenizer in ("file", "gpt2", "gpt1"):
        mine = tokenizer_lib.from_config(cfg, "", lambda n: iter(()))
        if mine.fingerprint != t["fingerprint"]:
            raise ConfigError(f"data.tokenizer_path={d.tokenizer_path!r} has fingerprint "
                              f"{mine.fingerprint}, but {where} was tokenized with "
                              f"{t['fingerprint']}; use the store's {t['file']} or re-prepare")
    tokenizer_lib.check_vocab(tok, cfg)
    return tok


def mixture_weights(cfg: ml_collections.ConfigDict,
                    token_store: store.TokenStore) -> dict[str, float]:
    """`data.mixture` checked against the store's sources (sum 1, known names)."""
    names = token_store.sources
    weights = {k: float(v) for k, v in cfg.data.mixture.items()}
    if not weights:
        if len(names) > 1:
            raise ConfigError(f"data.mixture is empty, but the store {token_store.path} has "
                              f"sources {names}; give each a weight (GPT-3 Table 2.2)")
        return {names[0]: 1.0}
    for name, w in weights.items():
        if name not in names:
            raise ConfigError(f"data.mixture.{name}: no such source in the store "
                              f"{token_store.path}; it has {names}")
        if not w > 0:
            raise ConfigError(f"data.mixture.{name}={w} must be > 0 (drop a source instead)")
    if abs(sum(weights.values()) - 1.0) > 1e-6:
        raise ConfigError(f"data.mixture={weights} sums to {sum(weights.values()):.6g}, not 1")
    batches.check_mixture(weights, cfg.train.batch_size // cfg.train.microbatches)
    return weights


def _open_or_build(cfg: ml_collections.ConfigDict) -> tuple[store.TokenStore, Tokenizer]:
    """The in-process path's store for `data.source`, reused when complete and matching."""
    d = cfg.data
    if d.get("sources") or d.dedup.exact or d.dedup.fuzzy or d.quality.enabled:
        raise ConfigError("data.sources/data.dedup/data.quality are applied by `python -m "
                          "gpt_jax.prepare`, not in-process; prepare a store and set data.store")
    source = sources.make_source(cfg)
    tok = tokenizer_lib.from_config(cfg, source.key, source.sample)
    directory = d.token_dir or default_token_dir(cfg, source, tok)
    field = "data.token_dir" if d.token_dir else "data.data_dir"
    remote = "://" in directory
    try:
        token_store = store.TokenStore.open(directory, field=field)
        t = token_store.manifest["tokenizer"]
        if t["fingerprint"] != tok.fingerprint:
            raise ConfigError(f"{field}={directory!r} was tokenized with tokenizer fingerprint "
                              f"{t['fingerprint']}, not {tok.fingerprint}; delete it or point "
                              "data.token_dir elsewhere")
        return token_store, tok
    except ConfigError:
        if d.token_dir and epath.Path(directory, store.MANIFEST).exists():
            raise  # an explicit store that exists is checked, never silently rebuilt
    if not remote or jax.process_index() == 0:
        build_store(directory, d.source, source, tok, d.shard_tokens, d.num_workers)
    if remote and jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"token store {directory}")
    return store.TokenStore.open(directory, field=field), tok


def prepare(cfg: ml_collections.ConfigDict) -> Corpus:
    """The run's corpus: `data.store` opened and checked, or the in-process store built or
    reused. ConfigError naming the field for: an incomplete store or shard, another tokenizer,
    a vocabulary larger than `model.vocab_size`, bad mixture weights, a `model.context` longer
    than a split."""
    if cfg.data.store:
        token_store = store.TokenStore.open(cfg.data.store)
        tok = store_tokenizer(cfg, token_store)
    else:
        token_store, tok = _open_or_build(cfg)
    corpus = Corpus(tok, token_store, mixture_weights(cfg, token_store))
    check_context(corpus, cfg.model.context)
    return corpus


def unigram_entropy(tokens: Any, vocab_size: int, max_tokens: int = 1 << 24) -> float:
    """Entropy (nats) of the token frequencies (of the first `max_tokens`): the loss of the
    best context-free model."""
    counts = np.bincount(np.asarray(tokens[:max_tokens]), minlength=vocab_size)
    p = counts[counts > 0].astype(np.float64) / counts.sum()
    return float(-(p * np.log(p)).sum())
