"""`python -m gpt_jax.prepare --config=... --output=DIR [-- beam options]`: a token store.

Runs `data.pipeline` (Apache Beam) over the config's data section: its sources, GPT-3's
filters (`data.dedup`, `data.quality`), its tokenizer, and writes a sharded token store to
`--output` (local or gs://), manifest last. Train on it with `--config.data.store=DIR`.
Everything after `--` goes to Beam: the DirectRunner by default, e.g.
`-- --direct_num_workers=2 --direct_running_mode=multi_processing`, or
`-- --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp` (README
"Data at scale"; gpt_jax and what its workers import are staged as a generated
`--setup_file`, see `gpt_jax/data/workers.py`).
"""

from __future__ import annotations

import time

from absl import flags, logging
from ml_collections import config_flags

from gpt_jax import cli
from gpt_jax.workdir import configure_storage

config_flags.DEFINE_config_file("config", None, "Experiment config whose data section to "
                                "prepare.", lock_config=True)
flags.DEFINE_string("output", None, "Store directory (local or gs://).")
flags.mark_flags_as_required(["config", "output"])


STAGES = ("read", "after_exact_dedup", "after_fuzzy_dedup", "after_quality_filter")  # in order


def summary(manifest: dict, seconds: float) -> str:
    """One line per source: documents through each stage, tokens and shards per split."""
    lines = []
    docs = tokens = 0
    for name, source in sorted(manifest["sources"].items()):
        c = source["counts"]
        stages = sorted((k for k in c if k != "kept_fraction"),  # JSON sorts them by name
                        key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
        funnel = " -> ".join(f"{k} {c[k]}" for k in stages)
        splits = ", ".join(f"{s} {r['num_tokens']:,} tokens in {len(r['shards'])} shards"
                           for s, r in source["splits"].items())
        lines.append(f"{name}: {funnel} (kept {c['kept_fraction']:.1%}); {splits}")
        docs += c["read"]
        tokens += sum(r["num_tokens"] for r in source["splits"].values())
    lines.append(f"{docs:,} documents, {tokens:,} tokens in {seconds:.1f} s: "
                 f"{docs / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tokens/s")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from gpt_jax.data import pipeline  # needs the [data] extra (apache-beam, datasketch...)
    configure_storage()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    tic = time.perf_counter()
    try:
        manifest = pipeline.run(flags.FLAGS.config, flags.FLAGS.output, argv[1:])
    except pipeline.PrepareError:
        raise
    except Exception as e:  # Beam re-raises a worker's error wrapped in its own
        marker = "PrepareError: "
        text = str(e)
        if marker in text:
            raise pipeline.PrepareError(text[text.rindex(marker) + len(marker):]
                                        .splitlines()[0].strip(" '\"")) from None
        raise
    print(summary(manifest, time.perf_counter() - tic))
    out = flags.FLAGS.output
    print(f"store: {out} (train on it with --config.data.store={out})")


if __name__ == "__main__":
    from gpt_jax.data.pipeline import PrepareError
    cli.run(main, errors=(PrepareError,))
