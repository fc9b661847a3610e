#!/usr/bin/env bash
# benchmarks/fast_recipe.py (each setting in its own process), and ResNet-50 extraction images/s again (after items became uint8, normalised on the device, and
# features stayed on the device until their shard is written), on a lent GPU machine:
#
#     bash benchmarks/gpu_run3.sh      # ~6 min on one H100; results under $OUT (default /tmp/gpu_out)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout -k 10 200 python3 benchmarks/gpu_throughput.py --only resnet50_extract --out "$OUT/gpu_extract.json" \
  2>&1 | tee "$OUT/gpu_extract.log" | tail -12
echo "total ${SECONDS} s"
timeout -k 10 200 python3 benchmarks/fast_recipe.py --epochs 5 --out "$OUT/fast_recipe.json" 2>&1 | tee "$OUT/fast_recipe.log" | grep -v "^\s*$" | tail -8
echo "total ${SECONDS} s"
