#!/usr/bin/env bash
# The GPU evidence for the fast hypergradient, in one run of under 8 minutes on one card:
#   1. the CUDA-only tests (fast under bf16 and fp16 within 2 % of float32, fp16/bf16 training, device placement of
#      every tensor of a meta step, the fp16 trainer test);
#   2. the step-time benchmark at GPU sizes (wall time, synchronised; ratios to plain in one process).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]    (default: $OUT if set, else benchmarks/gpu)
# Never part of the default test run. Record the card's name and the ratios in experiments/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/gpu}}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$py" - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu_check.sh needs a CUDA device"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY

echo "== CUDA-only tests"
timeout 180 "$py" -m pytest -q -x -p no:cacheprovider tests/test_fast_gpu.py \
    "tests/test_precision.py::test_fp16_trains_on_gpu" -rs 2>&1 | tee "$out/gpu_tests.txt"

echo "== benchmark (GPU sizes, wall time)"
timeout 300 "$py" benchmarks/hypergrad.py --device cuda --reps 3 --no-memory \
    --archs mlp4096 resnet resnet_bn minilm_adamw minilm_sgd minilm_lora minilm_frozen \
    --methods plain fast fast_k5 unrolled finite_difference \
    --out "$out/bench_gpu.json" 2>&1 | grep -v -i "warn" | tee "$out/bench_gpu.txt"
echo "results in $out"
