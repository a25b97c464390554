#!/usr/bin/env bash
# Preparation throughput at scale (issue 28 item 5; benchmarks/prepare_scale.py): a 1.1 GB
# synthetic web-text corpus of parquet files in WORK_DIR (made once, deterministically), then
#   1. sentencepiece's own batch encode vs our per-document encode, one core;
#   2. tokenize-only: the whole corpus through `pipeline.run`, DirectRunner, WORKERS processes;
#   3. GPT-3's recipe (exact + MinHash fuzzy dedup + quality filter) on GPT3_SLICES web files
#      (default 3: 100.7 MB), one 33.5 MB file per run: the fuzzy dedup's band elements are
#      ~35x the text, and the DirectRunner holds a stage's output in its one runner process,
#      so one file peaks at ~9 GB of RSS here (a run of 3 files passed 13 GB within a minute
#      and was stopped; docs/data_cost.md).
# Each run prints one JSON line (benchmarks/README.md "Preparing at scale" reads them).
#
#   bash benchmarks/prepare_scale.sh [WORK_DIR] [WORKERS] [GPT3_SLICES]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/prepare_scale}
WORKERS=${2:-2}
GPT3_SLICES=${3:-3}
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
for ((k = 0; k < GPT3_SLICES; k++)); do
    rm -rf "$WORK"/store-gpt3-*
    python benchmarks/prepare_scale.py run --out "$WORK" --recipe gpt3 --files 1 --skip "$k" \
        --workers "$WORKERS" 2> "$WORK/gpt3-$k.log"
done
