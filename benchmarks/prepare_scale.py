"""Corpus preparation at scale (issue 28 item 5): `gpt_jax.data.pipeline` on Beam's
multi-processing DirectRunner over a synthetic web-text corpus of parquet files.

    python benchmarks/prepare_scale.py gen --out /tmp/prepare_scale --bytes 1.1e9
    python benchmarks/prepare_scale.py spm --out /tmp/prepare_scale            # the library
    python benchmarks/prepare_scale.py run --out /tmp/prepare_scale --recipe tokenize
    python benchmarks/prepare_scale.py run --out /tmp/prepare_scale --recipe gpt3
    python benchmarks/prepare_scale.py shuffle --out /tmp/prepare_scale  # dedup shuffle bytes

`gen` writes, deterministically (seeded; from this interpreter's standard library):
- `web/NNN.parquet`: FineWeb's `text` and `id` columns, files of ~32 MB. Each document is
  4-8 "paragraphs", each a run of 5-25 consecutive lines from a random place of the stdlib's
  850k lines, 1 in 10 paragraphs with one word replaced: unique documents that share lines
  and boilerplate (`self.`, `return None`) as web pages share phrases, so MinHash has buckets
  to join and Jaccards to compute. 3% of documents are exact copies of an earlier one (case
  and whitespace changed), 4% near copies (3% of the words changed): dedup has work.
- `books/000.parquet`: the reference class of GPT-3's quality filter, 4,000 documents made
  like the web ones but of the lines of one third of the stdlib's files only (seeded apart,
  `books`), so a web document's score follows its share of such paragraphs: a spread of
  scores, as GPT-3's classifier gave Common Crawl, not two languages told apart;
- `spm.model`: a sentencepiece BPE of 8,192 pieces trained on 5M characters of `web`
  (`gpt_jax.tokenizer.train_sentencepiece`, what `data.tokenizer='sentencepiece'` trains).

`run` times `pipeline.run` on the first `--files` web files (0: all) with `--workers` worker
processes, the tokenizer read from `spm.model` (`data.tokenizer='file'`), recipe `tokenize`
(no filters) or `gpt3` (experiments/gpt3.py's `data_recipe` filters: exact dedup, MinHash
fuzzy dedup at its defaults, and the quality filter at alpha 9 trained on `books` against
`web`), and prints one JSON line: documents/s and tokens/s of the whole run and per worker of
the Beam phase (from `pipeline.build` to the manifest; the launcher's listing, tokenizer load
and classifier training are timed apart), the funnel, peak RSS of the launcher+runner.

`shuffle` counts the bytes each shuffle of the dedup stages carries per byte of text (the
transforms' own element functions run in memory, encoded with Beam's coder), and those of
the band elements before issue 28's fix.

`spm` is the library's own throughput on the same documents and model: sentencepiece's batch
`encode` (C++, `num_threads=1`) against `Tokenizer.encode_array` per document, one core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import sysconfig
import time

import numpy as np

FILE_BYTES = 32 << 20
VOCAB = 8192
GOOD = 1 / 3  # the share of the stdlib's files whose lines the reference documents use
BOOKS = 4000


def _stdlib_lines(good: bool = False) -> list[str]:
    """The non-blank lines of the stdlib's .py files in order; `good`: only of the files whose
    path hashes below GOOD (the books' "well-written" third)."""
    from gpt_jax.data import sources

    root = sysconfig.get_paths()["stdlib"]
    lines: list[str] = []
    for rel in sources.stdlib_files(root):
        if good and sources.hash_fraction(rel) >= GOOD:
            continue
        text = sources.read_text(os.path.join(root, rel))
        if text:
            lines += [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines


def _paragraph(rng: np.random.Generator, lines: list[str]) -> str:
    start, n = int(rng.integers(len(lines) - 30)), int(rng.integers(5, 26))
    return "\n".join(lines[start:start + n])


def books(out: str) -> None:
    """The quality filter's reference class: documents made like `web`'s of the lines of one
    third of the stdlib's files only, so a web document's score follows its share of such
    paragraphs (a spread of scores, as GPT-3's classifier gave Common Crawl), not a
    different language."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng, lines = np.random.default_rng(1), _stdlib_lines(good=True)
    docs = ["\n\n".join(_paragraph(rng, lines) for _ in range(int(rng.integers(4, 9))))
            for _ in range(BOOKS)]
    os.makedirs(os.path.join(out, "books"), exist_ok=True)
    pq.write_table(pa.table({"text": docs}), os.path.join(out, "books", "000.parquet"))


def gen(args: argparse.Namespace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpt_jax import tokenizer

    tic = time.perf_counter()
    lines = _stdlib_lines()
    vocab = sorted({w for line in lines[::50] for w in line.split() if w.isidentifier()})
    rng = np.random.default_rng(0)
    web = os.path.join(args.out, "web")
    os.makedirs(web, exist_ok=True)
    total, f, docs, kept = 0, 0, 0, []  # kept: a reservoir of earlier documents to copy
    index: list[dict] = []  # per file: documents and UTF-8 bytes of text

    def paragraph() -> str:
        start, n = int(rng.integers(len(lines) - 30)), int(rng.integers(5, 26))
        para = lines[start:start + n]
        if rng.random() < 0.1:
            i = int(rng.integers(n))
            words = para[i].split(" ")
            words[int(rng.integers(len(words)))] = vocab[int(rng.integers(len(vocab)))]
            para[i] = " ".join(words)
        return "\n".join(para)

    def near_copy(text: str) -> str:
        words = text.split(" ")
        for i in rng.choice(len(words), max(1, len(words) * 3 // 100), replace=False):
            words[i] = vocab[int(rng.integers(len(vocab)))]
        return " ".join(words)

    while total < args.bytes:
        texts, size = [], 0
        while size < FILE_BYTES and total + size < args.bytes:
            r = rng.random()
            if kept and r < 0.03:
                text = "  " + kept[int(rng.integers(len(kept)))].upper() + "\n"
            elif kept and r < 0.07:
                text = near_copy(kept[int(rng.integers(len(kept)))])
            else:
                text = "\n\n".join(paragraph() for _ in range(int(rng.integers(4, 9))))
                if len(kept) < 5000:
                    kept.append(text)
                elif rng.random() < 0.01:
                    kept[int(rng.integers(len(kept)))] = text
            texts.append(text)
            size += len(text.encode("utf-8"))
        ids = [f"<urn:uuid:{f}-{i}>" for i in range(len(texts))]
        pq.write_table(pa.table({"text": texts, "id": ids}),
                       os.path.join(web, f"{f:03d}.parquet"), row_group_size=1024)
        index.append({"file": f"{f:03d}.parquet", "documents": len(texts), "bytes": size})
        total, f, docs = total + size, f + 1, docs + len(texts)
        print(f"web/{f - 1:03d}.parquet: {len(texts):,} documents, {size / 1e6:.1f} MB "
              f"(total {total / 1e9:.3f} GB)", file=sys.stderr)
    with open(os.path.join(web, "index.json"), "w") as fh:
        json.dump(index, fh, indent=0)
    books(args.out)
    sample, chars = [], 0
    for text in pq.ParquetFile(os.path.join(web, "000.parquet")).read().column(0).to_pylist():
        sample.append(text)
        chars += len(text)
        if chars > 5_000_000:
            break
    tok = tokenizer.train_sentencepiece(sample, VOCAB)
    with open(os.path.join(args.out, "spm.model"), "wb") as fh:
        fh.write(tok.serialize())
    print(json.dumps({"files": f, "documents": docs, "bytes": total, "books": BOOKS,
                      "seconds": round(time.perf_counter() - tic, 1)}))


def _web_files(out: str, n: int) -> list[str]:
    web = os.path.join(out, "web")
    files = sorted(os.path.join(web, name) for name in os.listdir(web) if
                   name.endswith(".parquet"))
    return files[:n] if n else files


def _texts(files: list[str], max_docs: int = 0) -> list[str]:
    import pyarrow.parquet as pq
    out: list[str] = []
    for path in files:
        out += pq.ParquetFile(path).read(columns=["text"]).column(0).to_pylist()
        if max_docs and len(out) >= max_docs:
            return out[:max_docs]
    return out


def spm(args: argparse.Namespace) -> None:
    """sentencepiece's own batch encode against our per-document path, one core."""
    import sentencepiece

    from gpt_jax import tokenizer
    from gpt_jax.data import encode

    docs = _texts(_web_files(args.out, 1), args.docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    model = open(os.path.join(args.out, "spm.model"), "rb").read()
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    tok = tokenizer.load_tokenizer(os.path.join(args.out, "spm.model"))
    results = {"documents": len(docs), "bytes": n_bytes, "load": os.getloadavg()[0]}
    for name, fn in (
            ("sentencepiece batch encode, num_threads=1",
             lambda: sum(len(x) for x in sp.encode(docs, num_threads=1))),
            ("Tokenizer.encode_array per document",
             lambda: sum(len(tok.encode_array(d)) for d in docs)),
            ("encode.encode_documents (the pipeline's call)",
             lambda: len(encode.encode_documents(tok, docs)[0]) - len(docs))):
        tic, cpu = time.perf_counter(), time.process_time()
        tokens = fn()
        s, cpu = time.perf_counter() - tic, time.process_time() - cpu
        results[name] = {"seconds": round(s, 2), "cpu_seconds": round(cpu, 2), "tokens": tokens,
                         "MB_per_cpu_s": round(n_bytes / cpu / 1e6, 2),
                         "tokens_per_cpu_s": round(tokens / cpu),
                         "docs_per_s": round(len(docs) / s), "tokens_per_s": round(tokens / s),
                         "MB_per_s": round(n_bytes / s / 1e6, 2)}
    print(json.dumps(results, indent=1))


def _cpu() -> float:
    """User + system CPU-seconds of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(args: argparse.Namespace) -> None:
    from gpt_jax import config
    from gpt_jax.data import pipeline

    files = _web_files(args.out, args.skip + args.files)[args.skip:]
    index = {e["file"]: e for e in json.load(open(os.path.join(args.out, "web", "index.json")))}
    text_bytes = sum(index[os.path.basename(p)]["bytes"] for p in files)
    n_bytes = sum(os.path.getsize(p) for p in files)
    cfg = config.base_config()
    cfg.model.vocab_size = VOCAB
    d = cfg.data
    d.update(tokenizer="file", tokenizer_path=os.path.join(args.out, "spm.model"),
             data_dir=os.path.join(args.out, "data"), val_fraction=0.005)
    web = {"source": "hf", "hf_path": "parquet", "hf_data_files": ",".join(files)}
    if args.recipe == "tokenize":
        d.sources = {"web": web}
    else:  # experiments/gpt3.py data_recipe's filters, on one raw and one reference source
        d.sources = {"web": dict(web, dedup={"exact": True, "fuzzy": True}),
                     "books": {"source": "hf", "hf_path": "parquet", "hf_data_files":
                               os.path.join(args.out, "books", "000.parquet")}}
        d.quality.update(enabled=True, sources="web", raw_sources="web",
                         reference_sources="books")
        d.val_fraction = 0.05  # alpha 9 keeps few: a validation split that is not empty
    phases: dict[str, float] = {}
    real_build, real_train = pipeline.build, pipeline.train_classifier

    def build(*a, **k):
        phases["beam_start"], phases["beam_cpu"] = time.perf_counter(), _cpu()
        return real_build(*a, **k)

    def train_classifier(*a, **k):
        tic = time.perf_counter()
        out = real_train(*a, **k)
        phases["classifier_s"] = time.perf_counter() - tic
        return out

    pipeline.build, pipeline.train_classifier = build, train_classifier
    output = os.path.join(args.out, f"store-{args.recipe}-{args.skip}-{args.files}-"
                                    f"{args.workers}")
    beam_args = [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    load = os.getloadavg()
    tic, cpu = time.perf_counter(), _cpu()
    manifest = pipeline.run(cfg, output, beam_args)
    end, cpu, beam_cpu = time.perf_counter(), _cpu() - cpu, _cpu() - phases["beam_cpu"]
    beam_s = end - phases["beam_start"]
    entry = manifest["sources"]["web"]
    read = entry["counts"]["read"]
    tokens = {name: sum(s["num_tokens"] for s in src["splits"].values())
              for name, src in manifest["sources"].items()}
    kept_bytes = sum(s["num_bytes"] for s in entry["splits"].values())
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "recipe": args.recipe, "workers": args.workers, "files": len(files), "skip": args.skip,
        "parquet_bytes": n_bytes, "web_text_bytes": text_bytes, "web_docs_read": read,
        "counts": entry["counts"],
        "tokens": tokens, "web_kept_text_bytes": kept_bytes,
        "seconds_total": round(end - tic, 1), "launcher_s": round(phases["beam_start"] - tic, 1),
        "classifier_s": round(phases.get("classifier_s", 0.0), 1), "beam_s": round(beam_s, 1),
        "web_docs_read_per_s_per_worker": round(read / beam_s / args.workers, 1),
        "tokens_per_s_per_worker": round(sum(tokens.values()) / beam_s / args.workers),
        "web_text_MB_read_per_s_per_worker": round(text_bytes / beam_s / args.workers / 1e6, 3),
        # CPU-seconds of the launcher, the runner and its worker processes (reaped children):
        # what the run costs whatever else shares the machine's cores
        "cpu_s": round(cpu, 1), "beam_cpu_s": round(beam_cpu, 1),
        "web_text_MB_read_per_beam_cpu_s": round(text_bytes / beam_cpu / 1e6, 3),
        "web_docs_read_per_cpu_s": round(read / cpu, 1),
        "tokens_per_cpu_s": round(sum(tokens.values()) / cpu),
        "web_text_MB_read_per_cpu_s": round(text_bytes / cpu / 1e6, 3),
        "load_before": load, "load_after": os.getloadavg(),
        "max_rss_mb_launcher": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "max_rss_mb_largest_child": children.ru_maxrss // 1024,
    }))


def shuffle(args: argparse.Namespace) -> None:
    """Bytes each shuffle of the GPT-3 recipe's dedup carries, per byte of text, on the web
    files `run` would read: the elements `ExactDedup` and `FuzzyDedup` group, made by the
    transforms' own functions and encoded with Beam's coder for untyped elements
    (FastPrimitivesCoder, what the runner ships), the stages run in memory. `old_bands`: the
    band elements of the design before issue 28's fix, (band key, (doc key, frozenset of
    shingle strings)), on the first `--old-docs` documents."""
    import apache_beam as beam

    from gpt_jax.data import dedup

    coder = beam.coders.FastPrimitivesCoder()

    def size(element: object) -> int:
        return len(coder.encode(element))

    files = _web_files(args.out, args.skip + args.files)[args.skip:]
    docs = [(f"{i:020d}:train", t) for i, t in enumerate(_texts(files))]
    text_bytes, n_read = sum(len(t.encode("utf-8")) for _, t in docs), len(docs)
    tic, cpu = time.perf_counter(), time.process_time()
    sizes = dict.fromkeys(["exact", "bands", "join_candidates", "candidate_texts", "dups",
                           "join_dups"], 0)
    kept: dict[str, tuple[str, str]] = {}  # ExactDedup: the smallest doc key per exact key
    for key, text in docs:
        ek = dedup.exact_key(text)
        sizes["exact"] += size((ek, ((key, text), 1)))  # one accumulator per key (lifted)
        if ek not in kept or (key, text) < kept[ek]:
            kept[ek] = (key, text)
    docs = sorted(kept.values())
    old_bands, old_text = 0, 0
    buckets: dict[bytes, list[str]] = {}
    for n, doc in enumerate(docs):
        bands = dedup._to_bands(doc, 5, 10, 10, 1, 0)
        sizes["bands"] += sum(size(e) for e in bands)
        for band, key in bands:
            buckets.setdefault(band, []).append(key)
        if n < args.old_docs:
            sh = frozenset(dedup.shingles(doc[1], 5))
            old_bands += sum(size((band, (doc[0], sh))) for band, _ in bands)
            old_text += len(doc[1].encode("utf-8"))
    membership: dict[str, set[bytes]] = {}
    for bucket in buckets.items():
        for key, bucket_id in dedup._candidate_bucket(bucket, 1000):
            membership.setdefault(key, set()).add(bucket_id)
    texts = dict(dedup._pack(doc) for doc in docs)  # the joins ship zlib'd texts
    groups: dict[bytes, list] = {}
    for key, _ in docs:  # CoGroupByKey: both sides, each element tagged
        sizes["join_candidates"] += size((key, (0, texts[key])))
        for bucket_id in membership.get(key, ()):
            sizes["join_candidates"] += size((key, (1, bucket_id)))
    for key, ids in membership.items():
        for bucket_id in ids:
            sizes["candidate_texts"] += size((bucket_id, (key, texts[key])))
            groups.setdefault(bucket_id, []).append((key, texts[key]))
    dups = set()
    for bucket in groups.items():
        dups.update(dedup._bucket_dups(bucket, 5, 0.5))
    sizes["dups"] = sum(size((key, None)) for key in dups)
    sizes["join_dups"] = sum(size((key, (0, texts[key]))) for key, _ in docs) + sum(
        size((key, (1, None))) for key in dups)
    fuzzy = sum(v for k, v in sizes.items() if k != "exact")
    print(json.dumps({
        "files": len(files), "skip": args.skip, "documents": n_read,
        "web_text_bytes": text_bytes, "after_exact": len(docs), "fuzzy_duplicates": len(dups),
        "candidate_buckets": len(groups), "candidate_docs": len(membership),
        "bytes": sizes, "per_text_byte": {k: round(v / text_bytes, 3) for k, v in sizes.items()},
        "fuzzy_per_text_byte": round(fuzzy / text_bytes, 3),
        "dedup_per_text_byte": round((fuzzy + sizes["exact"]) / text_bytes, 3),
        "old_bands_per_text_byte": round(old_bands / max(old_text, 1), 2),
        "old_docs": min(args.old_docs, len(docs)),
        "seconds": round(time.perf_counter() - tic, 1),
        "cpu_s": round(time.process_time() - cpu, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--out", required=True)
    g.add_argument("--bytes", type=float, default=1.1e9)
    b = sub.add_parser("books", help="only the reference documents")
    b.add_argument("--out", required=True)
    s = sub.add_parser("spm")
    s.add_argument("--out", required=True)
    s.add_argument("--docs", type=int, default=4000)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--recipe", choices=("tokenize", "gpt3"), default="tokenize")
    r.add_argument("--files", type=int, default=0, help="first N web files (0: all)")
    r.add_argument("--skip", type=int, default=0, help="from web file N on")
    r.add_argument("--workers", type=int, default=2)
    h = sub.add_parser("shuffle", help="bytes the dedup shuffles carry, per byte of text")
    h.add_argument("--out", required=True)
    h.add_argument("--files", type=int, default=0, help="first N web files (0: all)")
    h.add_argument("--skip", type=int, default=0, help="from web file N on")
    h.add_argument("--old-docs", type=int, default=1000)
    args = parser.parse_args()
    if args.cmd == "books":
        return books(args.out)
    {"gen": gen, "spm": spm, "run": run, "shuffle": shuffle}[args.cmd](args)


if __name__ == "__main__":  # Beam's worker processes must not rerun the command
    main()
