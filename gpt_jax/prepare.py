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

import logging as std_logging
import os
import socket
import time
import urllib.parse

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


GCS_ENDPOINT = "https://storage.googleapis.com"
PROBE_TIMEOUT_S = 10.0


def storage_endpoint() -> str:
    """The Cloud Storage endpoint gs:// paths go to: the local server's if one is set."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and "://" not in emulator:
        emulator = f"http://{emulator}"
    return emulator or GCS_ENDPOINT


def unreachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a TCP connection to `endpoint` cannot be made within `timeout_s`, or None.

    A probe before the pipeline: an endpoint that does not resolve, refuses or never
    answers is not a storage blip to retry for minutes (gcsfs spends about 90 s on one
    before it gives up), and Beam would wrap the failure in a page of traceback."""
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror as e:
        return f"{host} does not resolve ({e.strerror or e})"
    except TimeoutError:
        return f"{host}:{port} did not answer within {timeout_s:g} s"
    except OSError as e:
        return f"{host}:{port} refused the connection ({e.strerror or e})"


class _Unimportant(std_logging.Filter):
    """Drops Beam's import-time warning about optional BigQuery clients, printed on every
    run whether or not BigQuery is used."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def main(argv: list[str]) -> None:
    cli.check_output_dir("--output", flags.FLAGS.output)  # a file there: before the pipeline
    from gpt_jax.data import pipeline  # needs the [data] extra (apache-beam, datasketch...)
    configure_storage()
    places = (("--output", flags.FLAGS.output), ("data.data_dir", flags.FLAGS.config.data.data_dir))
    remote = [f"{name}={path}" for name, path in places if str(path).startswith("gs://")]
    if remote:
        why = unreachable(storage_endpoint())
        if why:  # the network, not the command line: exit 1
            raise ConnectionError(f"cannot reach Cloud Storage at {storage_endpoint()} for "
                                  f"{', '.join(remote)}: {why}; check the network, or "
                                  "STORAGE_EMULATOR_HOST for a local server")
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
    std_logging.getLogger().addFilter(_Unimportant())  # before Beam is first imported
    from gpt_jax.data.pipeline import PrepareError
    cli.run(main, errors=(PrepareError,))
