#!/usr/bin/env bash
# The performance issue's accelerator figures in one run (a few minutes on one H100/H200):
# GPT-2 small (124M), context 1024, bfloat16, dropout 0:
#   1. gpt_jax's train step with model.attention_impl=cudnn and =xla: tokens/s, MFU against
#      the data-sheet peak (PaLM convention, gpt_jax/flops.py), memory, and the JAX
#      profiler's top events (`gpt_jax.bench --profile_dir`);
#   2. one attention layer fwd+bwd per kernel and context (`gpt_jax.bench --mode=attention`);
#   3. gpt_jax vs the PyTorch reference, eager and torch.compile (flash attention via
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
# The same train step with cuDNN's flash attention and with XLA's attention, side by side.
for impl in cudnn xla; do
  python -m gpt_jax.bench --config=experiments/gpt2.py:small \
    --config.model.dtype=bfloat16 --config.model.attention_impl="$impl" \
    --config.model.embd_pdrop=0 --config.model.resid_pdrop=0 --config.model.attn_pdrop=0 \
    --config.train.batch_size="$batch" --config.train.microbatches=1 \
    --repeats=5 --steps=10 --profile_dir="/tmp/gpt_jax_profile_$impl" \
    --json_out="$out/bench_$impl.json" | tee "$out/bench_$impl.txt"
done
# One attention layer fwd+bwd per kernel (XLA, cuDNN), dense and banded, by context.
python -m gpt_jax.bench --mode=attention --contexts=1024,2048,4096 --attn_batch=8 \
  --json_out="$out/attention.json" | tee "$out/attention.txt"
python benchmarks/compare.py --shapes=gpt2-1024 --batch="$batch" --dtype=bfloat16 --compile \
  --repeats=3 --steps=10 --json_out="$out/compare.json" | tee "$out/compare.txt"
