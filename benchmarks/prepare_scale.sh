#!/usr/bin/env bash
# Preparation throughput at scale (issue 28 item 5; benchmarks/prepare_scale.py): a 1.1 GB
# synthetic web-text corpus of parquet files in WORK_DIR (made once, deterministically), then
#   1. sentencepiece's own batch encode vs our per-document encode, one core;
#   2. tokenize-only: the whole corpus through `pipeline.run`, DirectRunner, WORKERS processes;
#   3. GPT-3's recipe (exact + MinHash fuzzy dedup + quality filter) on the first GPT3_FILES
#      web files in one run (default 10: 335.6 MB, ~11 GB of RSS on the DirectRunner, which
#      holds every shuffled collection in its runner process; 0: all 33, ~35 GB);
#   4. the bytes the dedup's shuffles carry per byte of text on the same files, and those of
#      the band elements before issue 28's fix (shingle sets per band: ~35x the text, which
#      held a 33.6 MB file at ~10 GB of RSS on the DirectRunner; docs/data_cost.md).
# Each run prints one JSON line (benchmarks/README.md "Preparing at scale" reads them).
#
#   bash benchmarks/prepare_scale.sh [WORK_DIR] [WORKERS] [GPT3_FILES]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/prepare_scale}
WORKERS=${2:-2}
GPT3_FILES=${3:-10}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
lscpu | grep -E "Model name|^CPU\(s\)"
echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
if [ ! -f "$WORK/spm.model" ]; then
    python benchmarks/prepare_scale.py gen --out "$WORK" --bytes 1.1e9
fi
python benchmarks/prepare_scale.py spm --out "$WORK" --docs 4000
rm -rf "$WORK"/store-*
python benchmarks/prepare_scale.py run --out "$WORK" --recipe tokenize --workers "$WORKERS" \
    2> "$WORK/tokenize.log"
rm -rf "$WORK"/store-gpt3-*
python benchmarks/prepare_scale.py run --out "$WORK" --recipe gpt3 --files "$GPT3_FILES" \
    --workers "$WORKERS" 2> "$WORK/gpt3.log"
python benchmarks/prepare_scale.py shuffle --out "$WORK" --files "$GPT3_FILES" 2> "$WORK/shuffle.log"
