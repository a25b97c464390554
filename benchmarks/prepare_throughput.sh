#!/usr/bin/env bash
# Corpus preparation throughput on the stdlib corpus of experiments/tiny.py (sentencepiece,
# 2,048 ids): the Beam pipeline (`python -m gpt_jax.prepare`, DirectRunner, 2 worker
# processes) against the in-process pool (`gpt_jax.data.prepare`, data.num_workers=2), each
# into a fresh store. The tokenizer is made first, untimed, and cached in DATA_DIR, so both
# timings are reading + tokenizing + writing shards (Beam's also its pipeline start-up).
#
#   bash benchmarks/prepare_throughput.sh [WORK_DIR] [DATA_DIR]
#
# WORK_DIR (default: a new temp dir) receives the two stores; DATA_DIR (default
# WORK_DIR/data) holds the cached tokenizer. Prints docs/s and tokens/s of each.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/prepare-bench.XXXXXX)}
DATA=${2:-$WORK/data}
CONFIG=experiments/tiny.py
mkdir -p "$WORK"
rm -rf "$WORK/beam" "$WORK/inproc"

python - "$CONFIG" "$DATA" <<'EOF'
# The tokenizer, trained once and cached in DATA (untimed).
import sys
import time

from gpt_jax import tokenizer
from gpt_jax.compile import load_config
from gpt_jax.data import sources

cfg = load_config(sys.argv[1])
cfg.data.data_dir = sys.argv[2]
tic = time.perf_counter()
source = sources.make_source(cfg)
tok = tokenizer.from_config(cfg, source.key, source.sample)
print(f"tokenizer {tok.kind} {tok.vocab_size} ready in {time.perf_counter() - tic:.1f} s "
      f"(cached in {sys.argv[2]})")
EOF

echo "== Beam: python -m gpt_jax.prepare (DirectRunner, 2 processes); load $(cut -d' ' -f1-3 /proc/loadavg)"
python -m gpt_jax.prepare --config="$CONFIG" --config.data.data_dir="$DATA" \
    --output="$WORK/beam" -- --direct_num_workers=2 --direct_running_mode=multi_processing

echo "== in-process: gpt_jax.data.prepare, data.num_workers=2; load $(cut -d' ' -f1-3 /proc/loadavg)"
# A file, not stdin: the pool's spawned workers re-import __main__ from its path.
cat > "$WORK/inproc_prepare.py" <<'EOF'
import sys
import time

from gpt_jax import data
from gpt_jax.compile import load_config

if __name__ == "__main__":  # the pool spawns workers that re-import __main__
    cfg = load_config(sys.argv[1])
    cfg.data.data_dir, cfg.data.token_dir, cfg.data.num_workers = sys.argv[2], sys.argv[3], 2
    tic = time.perf_counter()
    corpus = data.prepare(cfg)
    seconds = time.perf_counter() - tic
    splits = corpus.store.manifest["sources"]["stdlib"]["splits"].values()
    docs = sum(r["num_docs"] for r in splits)
    tokens = sum(r["num_tokens"] for r in splits)
    print(f"{docs:,} documents, {tokens:,} tokens in {seconds:.1f} s: {docs / seconds:,.0f} "
          f"docs/s, {tokens / seconds:,.0f} tokens/s")
EOF
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python "$WORK/inproc_prepare.py" "$CONFIG" "$DATA" \
    "$WORK/inproc"

python - "$WORK" <<'EOF'
# Same tokens both ways? (sha256 of every shard, from the manifests)
import json
import sys

def shards(path):
    m = json.load(open(f"{path}/manifest.json"))
    return {(n, s): [x["sha256"] for x in r["shards"]]
            for n, src in m["sources"].items() for s, r in src["splits"].items()}

same = shards(f"{sys.argv[1]}/beam") == shards(f"{sys.argv[1]}/inproc")
print(f"stores {'identical' if same else 'DIFFER'} shard for shard (sha256 in the manifests)")
EOF
