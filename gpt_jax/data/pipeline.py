"""Corpus preparation on Apache Beam: sources -> GPT-3's filters -> tokens -> token store.

The graph, per named source (`data.sources`, or the one `data.source`):

    read documents (file sources fan out over files; parquet files, TFDS splits and Hugging
      Face splits over their own shards; other record sources are read once, in order, and
      routed)
      -> exact dedup -> fuzzy dedup (MinHash LSH) -> quality filter     (each switchable)
      -> tokenize (every document + eot) -> chunks of DOCS_PER_CHUNK consecutive documents
    all sources: chunk sizes -> offsets (side input) -> pieces of fixed-size shards
      -> one writer per shard -> shard index records -> manifest (last, one element)

Documents keep their source index end to end, so with every filter off the store holds the
same tokens in the same order as the in-process path (`data.corpus`), shard for shard. The
manifest step reads the shard records as a side input, so it runs only after every shard is
written; a killed pipeline leaves no manifest, and a store without one never opens.
The tokenizer (and the quality classifier) are made on the launching machine first.

Runs on the DirectRunner here (`--direct_num_workers=2 --direct_running_mode=multi_processing`)
and on Dataflow, Flink or Spark with `--runner=...`, unchanged: for a remote runner `run`
stages gpt_jax and exactly what the workers import (`data.workers`), and refuses sources
that exist only on the launcher.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import ml_collections
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.config import ConfigError
from gpt_jax.data import dedup, encode, quality, sources, store, workers
from gpt_jax.tokenizer import Tokenizer

DOCS_PER_CHUNK = 1024  # consecutive documents tokenized into one array before sharding
CLASSIFIER_FILE = "quality/classifier.pkl"
METRICS = "gpt_jax.prepare"


class PrepareError(RuntimeError):
    """A store that must not be written (a source left empty by the filters)."""


# ---------------------------------------------------------------------------- recipe checks


def _names(field: str, value: str, known: list[str]) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    for n in names:
        if n not in known:
            raise ConfigError(f"{field}={value!r}: {n!r} is not a source; sources: {known}")
    return names


def check_recipe(cfg: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The sources' data fields, after checking the recipe; ConfigError naming the field."""
    specs = sources.source_specs(cfg)
    names = list(specs)
    for name, spec in specs.items():
        if spec.source not in sources.SOURCE_KINDS:
            field = f"data.sources.{name}.source" if cfg.data.get("sources") else "data.source"
            raise ConfigError(f"{field}={spec.source!r} is not one of {list(sources.SOURCE_KINDS)}")
        dd = spec.dedup
        if dd.fuzzy:
            try:
                dedup.FuzzyDedup(ngram=dd.ngram, num_perm=dd.num_perm, bands=dd.bands,
                                 rows=dd.rows, threshold=dd.threshold, max_bucket=dd.max_bucket)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    q = cfg.data.quality
    if q.enabled:
        _names("data.quality.sources", q.sources, names)
        for field in ("reference_sources", "raw_sources"):
            if not _names(f"data.quality.{field}", q[field], names):
                raise ConfigError(f"data.quality.{field} is empty; the quality classifier "
                                  f"needs both classes (sources: {names})")
    return specs


# ---------------------------------------------------------------------------- launcher side


def _interleaved_sample(made: dict[str, sources.Source]) -> Any:
    """max_chars -> documents for the tokenizer: the sources' samples taken in turn."""
    if len(made) == 1:
        return next(iter(made.values())).sample

    def sample(max_chars: int) -> Iterator[str]:
        streams = [s.sample(max_chars) for s in made.values()]
        for docs in itertools.zip_longest(*streams):
            yield from (d for d in docs if d is not None)
    return sample


def corpus_key(made: dict[str, sources.Source]) -> str:
    """The tokenizer cache key: the in-process path's for one source, else all of them."""
    keys = [source.key for source in made.values()]
    if len(keys) == 1:
        return keys[0]
    return "mixture-" + hashlib.sha1("\n".join(keys).encode()).hexdigest()[:10]


def train_classifier(cfg: ml_collections.ConfigDict, made: dict[str, sources.Source],
                     output: epath.Path) -> dict[str, Any]:
    """GPT-3 Appendix A: reference vs raw documents -> classifier saved into the store."""
    q = cfg.data.quality

    def docs(field: str) -> list[str]:
        names = _names(f"data.quality.{field}", q[field], list(made))
        out: list[str] = []
        for name in names:
            per = q.max_train_docs // len(names)
            out += [d for d in itertools.islice(made[name].sample(1), per) if d]
        return out

    reference, raw = docs("reference_sources"), docs("raw_sources")
    clf = quality.QualityClassifier.train(reference, raw, num_features_log2=q.num_features_log2,
                                          seed=cfg.data.seed)
    clf.save(output / CLASSIFIER_FILE)
    return {"file": CLASSIFIER_FILE, "reference_docs": len(reference), "raw_docs": len(raw),
            "heldout_accuracy": clf.heldout_accuracy}


def provenance(made: dict[str, sources.Source], tokenizer_file: epath.Path) -> dict[str, Any]:
    """What went in, for the manifest: gpt_jax's and Beam's versions, the tokenizer file's
    sha256, and every input file (path, size, and its mtime, or on gs:// its generation and
    crc32c, on hf:// its sha256). The filter and dedup parameters are in the recipe's data."""
    return {
        "gpt_jax": importlib.metadata.version("gpt_jax"),
        "apache_beam": beam.__version__,
        "tokenizer_sha256": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest(),
        "inputs": {name: s.inputs if s.inputs is not None else
                   [sources.file_record(path) for path, _ in s.files or []]
                   for name, s in made.items()},
    }


# ---------------------------------------------------------------------------- workers


def _doc_key(index: int, split: str) -> str:
    """Sorts by index; carries the split. Every filter keeps the smallest key of a group."""
    return f"{index:020d}:{split}"


def _read_file(item: tuple[int, str, str]) -> Iterator[tuple[str, str]]:
    index, path, split = item
    text = sources.read_text(path)
    if text is None:
        beam.metrics.Metrics.counter(METRICS, "files_not_utf8").inc()
    elif text:  # empty documents add no tokens (in-process, too): not counted as read
        yield _doc_key(index, split), text


def _read_shard(shard: dict[str, Any], spec: ml_collections.ConfigDict
                ) -> Iterator[tuple[str, str]]:
    """One shard (a parquet or TFDS file) of a record source: each record once, routed by
    its shard or its key."""
    for index, split, text in sources.shard_records(spec, shard):
        if text:
            yield _doc_key(index, split), text


def _read_routed(_: Any, spec: ml_collections.ConfigDict) -> Iterator[tuple[str, str]]:
    """A record source read once as one sequence, each record routed by its index."""
    for index, split, text in sources.make_source_from(spec).routed():
        if text:
            yield _doc_key(index, split), text


def _read_records(split: str, spec: ml_collections.ConfigDict) -> Iterator[tuple[str, str]]:
    for i, text in enumerate(sources.make_source_from(spec).docs(split)):
        if text:
            yield _doc_key(i, split), text


class _Tokenize(beam.DoFn):
    """(doc key, text) -> ((source, split, chunk), (index, tokens, utf-8 bytes))."""

    def __init__(self, name: str, tok: Tokenizer):
        self.name, self.tok = name, tok
        self.dtype = store.token_dtype(tok.vocab_size)

    def process(self, doc: tuple[str, str]) -> Iterator[Any]:
        key, text = doc
        if not text:
            return
        index, split = key.split(":")
        tokens, n_bytes, _ = encode.encode_documents(self.tok, [text])
        beam.metrics.Metrics.counter(METRICS, "tokens").inc(len(tokens))
        yield ((self.name, split, int(index) // DOCS_PER_CHUNK),
               (int(index), tokens.astype(self.dtype), n_bytes))


def _join_chunk(group: tuple[tuple, Any]) -> tuple[tuple, tuple[np.ndarray, int, int]]:
    key, docs = group
    docs = sorted(docs, key=lambda d: d[0])
    return key, (np.concatenate([d[1] for d in docs]), len(docs), sum(d[2] for d in docs))


def _offsets(group: tuple[tuple, Any]) -> tuple[tuple, dict[int, int]]:
    """(source, split), [(chunk, tokens)] -> chunk -> first token of the chunk in the split."""
    key, sizes = group
    starts, total = {}, 0
    for chunk, n in sorted(sizes):
        starts[chunk], total = total, total + n
    return key, starts


def _pieces(chunk: tuple[tuple, Any], offsets: dict, shard_tokens: int) -> Iterator[Any]:
    """A chunk's tokens cut at shard boundaries: ((source, split, shard), (offset, tokens))."""
    (name, split, index), (tokens, _, _) = chunk
    start = offsets[(name, split)][index]
    pos = 0
    while pos < len(tokens):
        shard, offset = divmod(start + pos, shard_tokens)
        take = min(shard_tokens - offset, len(tokens) - pos)
        yield (name, split, shard), (offset, tokens[pos:pos + take])
        pos += take


class _WriteShard(beam.DoFn):
    def __init__(self, output: str, dtype: str):
        self.output, self.dtype = output, dtype

    def process(self, group: tuple[tuple, Any]) -> Iterator[Any]:
        (name, split, shard), pieces = group
        pieces = sorted(pieces, key=lambda p: p[0])
        tokens = np.concatenate([p[1] for p in pieces]).astype(self.dtype)
        record = store.write_shard(self.output, store.shard_file(name, split, shard), tokens)
        beam.metrics.Metrics.counter(METRICS, "shards_written").inc()
        yield (name, split), (shard, record)


def _write_manifest(_: Any, shards: list, stats: list, counts: list, output: str,
                    base: dict[str, Any], descriptions: dict[str, dict],
                    stages: dict[str, list[str]]) -> Iterator[dict]:
    """The last write: every split of every source, or PrepareError if one came out empty."""
    by_split: dict[tuple, list] = {}
    for key, record in shards:
        by_split.setdefault(tuple(key), []).append(record)
    totals = {tuple(k): v for k, v in stats}
    count_of = {(name, stage): n for name, stage, n in counts}
    manifest = dict(base, sources={})
    for name, description in descriptions.items():
        funnel = {stage: count_of.get((name, stage), 0) for stage in stages[name]}
        splits = {}
        for split in sources.SPLITS:
            docs, n_bytes = totals.get((name, split), (0, 0))
            if not docs:
                raise PrepareError(
                    f"source {name!r}: the {sources.SPLIT_NAMES[split]} split has no documents "
                    f"after filtering (documents after each stage: {funnel}); loosen "
                    "data.dedup/data.quality or add data")
            records = [r for _, r in sorted(by_split[(name, split)], key=lambda x: x[0])]
            splits[split] = store.split_record(records, docs, n_bytes)
        kept = splits["train"]["num_docs"] + splits["val"]["num_docs"]
        funnel["kept_fraction"] = kept / max(funnel.get("read", 0), 1)
        manifest["sources"][name] = {"description": description["description"],
                                     "key": description["key"], "splits": splits,
                                     "counts": funnel}
    store.write_manifest(output, manifest)
    yield manifest


def _count(pcoll: beam.PCollection, name: str, stage: str) -> beam.PCollection:
    return (pcoll | f"{name}: count {stage}" >> beam.combiners.Count.Globally()
            | f"{name}: tag {stage}" >> beam.Map(lambda n, a=name, b=stage: (a, b, n)))


def _sum_pairs(pairs: Any) -> tuple[int, int]:
    pairs = list(pairs)
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


# ---------------------------------------------------------------------------- the pipeline


def build(p: beam.Pipeline, cfg: ml_collections.ConfigDict, output: str, tok: Tokenizer,
          specs: dict[str, ml_collections.ConfigDict], made: dict[str, sources.Source],
          recipe: dict[str, Any]) -> None:
    """Adds the preparation to pipeline `p`: `made` are the `specs`' sources (workers rebuild
    record sources from their spec)."""
    q = cfg.data.quality
    filtered = _names("data.quality.sources", q.sources, list(specs)) or list(specs)
    chunks, counts, descriptions, stages = [], [], {}, {}
    for name, spec in specs.items():
        source = made[name]
        descriptions[name] = {"description": source.description, "key": source.key}
        if source.files is not None:
            items = [(i, path, split) for i, (path, split) in enumerate(source.files)]
            docs = (p | f"{name}: files" >> beam.Create(items)
                    | f"{name}: spread" >> beam.Reshuffle()
                    | f"{name}: read" >> beam.FlatMap(_read_file))
        elif source.shards is not None:  # N workers read N shards in parallel
            docs = (p | f"{name}: shards" >> beam.Create(source.shards)
                    | f"{name}: spread" >> beam.Reshuffle()
                    | f"{name}: read" >> beam.FlatMap(_read_shard, spec=spec))
        elif source.routed is not None:  # one sequence: read once, not once per split
            docs = (p | f"{name}: sequence" >> beam.Create([name])
                    | f"{name}: read" >> beam.FlatMap(_read_routed, spec=spec))
        else:  # a source without shards or a routed sequence: each split read once
            docs = (p | f"{name}: splits" >> beam.Create(list(sources.SPLITS))
                    | f"{name}: read" >> beam.FlatMap(_read_records, spec=spec))
        stages[name] = ["read"]
        counts.append(_count(docs, name, "read"))
        dd = spec.dedup
        if dd.exact:
            docs = docs | f"{name}: exact dedup" >> dedup.ExactDedup()
            stages[name].append("after_exact_dedup")
            counts.append(_count(docs, name, "after_exact_dedup"))
        if dd.fuzzy:
            docs = docs | f"{name}: fuzzy dedup" >> dedup.FuzzyDedup(
                ngram=dd.ngram, num_perm=dd.num_perm, bands=dd.bands, rows=dd.rows,
                threshold=dd.threshold, seed=spec.seed, max_bucket=dd.max_bucket)
            stages[name].append("after_fuzzy_dedup")
            counts.append(_count(docs, name, "after_fuzzy_dedup"))
        if q.enabled and name in filtered:
            docs = docs | f"{name}: quality" >> quality.QualityFilter(
                os.fspath(epath.Path(output) / CLASSIFIER_FILE), alpha=q.alpha, seed=spec.seed)
            stages[name].append("after_quality_filter")
            counts.append(_count(docs, name, "after_quality_filter"))
        chunks.append(docs | f"{name}: tokenize" >> beam.ParDo(_Tokenize(name, tok))
                      | f"{name}: chunk" >> beam.GroupByKey()
                      | f"{name}: join" >> beam.Map(_join_chunk))
    chunks = chunks | "all chunks" >> beam.Flatten()
    offsets = (chunks | "sizes" >> beam.Map(lambda c: (c[0][:2], (c[0][2], len(c[1][0]))))
               | "by split" >> beam.GroupByKey() | "offsets" >> beam.Map(_offsets))
    stats = (chunks | "doc stats" >> beam.Map(lambda c: (c[0][:2], (c[1][1], c[1][2])))
             | "sum stats" >> beam.CombinePerKey(_sum_pairs))
    shard_tokens = cfg.data.shard_tokens
    shards = (chunks | "cut" >> beam.FlatMap(_pieces, offsets=beam.pvalue.AsDict(offsets),
                                             shard_tokens=shard_tokens)
              | "by shard" >> beam.GroupByKey()
              | "write shards" >> beam.ParDo(_WriteShard(output, store.token_dtype(
                  tok.vocab_size).name)))
    all_counts = counts | "all counts" >> beam.Flatten()
    base = store.make_manifest(tok, shard_tokens, {}, recipe)
    _ = (p | "manifest trigger" >> beam.Create([None])
         | "write manifest" >> beam.FlatMap(
             _write_manifest, shards=beam.pvalue.AsList(shards),
             stats=beam.pvalue.AsList(stats), counts=beam.pvalue.AsList(all_counts),
             output=output, base=base, descriptions=descriptions, stages=stages))


def run(cfg: ml_collections.ConfigDict, output: str, beam_args: list[str]) -> dict[str, Any]:
    """Prepares the store at `output`; returns its manifest. The tokenizer is made or read as
    the in-process path does (`data.tokenizer`), then saved into the store."""
    specs = check_recipe(cfg)
    workers.check_sources(specs, beam_args, single=not cfg.data.get("sources"))
    out = epath.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / store.MANIFEST).unlink(missing_ok=True)  # from here on the store reads incomplete
    # Each source once: a file source lists and stats all its files when it is made.
    made = {name: sources.make_source_from(spec) for name, spec in specs.items()}
    tok = tokenizer_lib.from_config(cfg, corpus_key(made), _interleaved_sample(made))
    tok.save(out)
    recipe: dict[str, Any] = {
        "made_by": "gpt_jax.prepare (Apache Beam)", "beam_args": list(beam_args),
        "data": {k: (v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v)
                 for k, v in cfg.data.items()},
    }
    recipe["provenance"] = provenance(made, out / tok.file_name)
    if cfg.data.quality.enabled:
        recipe["quality_classifier"] = train_classifier(cfg, made, out)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = ["--runner=DirectRunner", *beam_args]
    with tempfile.TemporaryDirectory(prefix="gpt_jax-staging-") as staging:
        # A remote runner's workers get the gpt_jax wheel and the pinned requirements.
        beam_args = workers.stage(beam_args, specs, cfg.data.quality.enabled, staging)
        with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
            build(p, cfg, os.fspath(out), tok, specs, made, recipe)
    return store.TokenStore.open(out, field="--output").manifest
