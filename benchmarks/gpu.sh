#!/usr/bin/env bash
# The performance issue's accelerator figures in one run (a few minutes on one H100/H200):
# GPT-2 small (124M), context 1024, bfloat16, cuDNN attention, dropout 0:
#   1. gpt_jax's train step: tokens/s, MFU against the data-sheet peak, memory, and the
#      JAX profiler's top events (`gpt_jax.bench --profile_dir`);
#   2. gpt_jax vs the PyTorch reference, eager and torch.compile (flash attention via
#      scaled_dot_product_attention, fused AdamW), same weights and batch.
# Run from the repository root on a machine with one NVIDIA GPU, CUDA JAX and PyTorch:
#   bash benchmarks/gpu.sh [OUT_DIR] [BATCH]
# Python packages the machine lacks (the lent GPU image has no ml_collections) are
# installed from wheels in ./.whl first (`pip download ml_collections --no-deps -d .whl`).
set -euo pipefail
out=${1:-gpu_results}
batch=${2:-16}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install -q --no-deps --no-index .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the GPU in compare.py
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv \
  | tee "$out/gpu.txt"
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" \
  | tee -a "$out/gpu.txt"
python -m gpt_jax.bench --config=experiments/gpt2.py:small \
  --config.model.dtype=bfloat16 --config.model.attention_impl=cudnn \
  --config.model.embd_pdrop=0 --config.model.resid_pdrop=0 --config.model.attn_pdrop=0 \
  --config.train.batch_size="$batch" --config.train.microbatches=1 \
  --repeats=5 --steps=10 --profile_dir=/tmp/gpt_jax_profile --json_out="$out/bench.json" \
  | tee "$out/bench.txt"
python benchmarks/compare.py --shapes=gpt2-1024 --batch="$batch" --dtype=bfloat16 --compile \
  --repeats=3 --steps=10 --json_out="$out/compare.json" | tee "$out/compare.txt"
