#!/usr/bin/env bash
# The second GPU check, run on a lent GPU machine from the repo root (carry the ignored .whl/):
#
#     bash benchmarks/gpu_run2.sh      # ~9 min on one H100; results under $OUT (default /tmp/gpu_out)
#
# tests/test_gpu.py again, then input pipelines and the fast recipe on the GPU: benchmarks/loader_vs_pil.py (device-resident
# loader vs torchvision's per-sample PIL pipeline with 2 workers), benchmarks/engine_vs_plain.py
# (the engine vs a hand-written loop) and benchmarks/fast_recipe.py (configs/cifar10_fast.yaml
# vs the same model trained fp32 eager with a DataLoader).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv
timeout -k 10 200 python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout -k 10 160 python3 benchmarks/fast_recipe.py --epochs 5 --out "$OUT/fast_recipe.json" 2>&1 | tee "$OUT/fast_recipe.log" | grep -v "^\s*$" | tail -8
timeout -k 10 100 python3 benchmarks/loader_vs_pil.py --repeats 3 --images 8192 --json "$OUT/loader_vs_pil.json" 2>&1 | tee "$OUT/loader_vs_pil.log" | tail -4
timeout -k 10 80 python3 benchmarks/engine_vs_plain.py --batch 256 --batches 100 --repeats 3 --json "$OUT/engine_vs_plain.json" 2>&1 | tee "$OUT/engine_vs_plain.log" | tail -3
echo "total ${SECONDS} s"
