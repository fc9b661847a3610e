#!/usr/bin/env bash
# ResNet-50 extraction with the device-resident path for in-memory sets, and ResNet-18 (CIFAR)
# training fp32 vs bf16 + channels_last + compile, on a lent GPU machine (carry .whl):
#
#     bash benchmarks/gpu_run4.sh      # ~4 min on one H100; results under $OUT (default /tmp/gpu_out)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout -k 10 250 python3 benchmarks/gpu_throughput.py --only resnet50_extract,resnet18_train --r18-epochs 6 \
  --budget-s 240 --out "$OUT/gpu_run4.json" 2>&1 | tee "$OUT/gpu_run4.log" | tail -14
echo "total ${SECONDS} s"
