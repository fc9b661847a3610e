#!/usr/bin/env bash
# For the next session with a lent GPU (carry .whl): the GPU tests, ResNet-50 extraction with
# shards written from a background thread (ShardWriter), the per-step non-finite check
# (train.nonfinite=skip vs stop), image-folder decoding on the GPU (data.decode=device) and the
# engine vs a plain loop after the per-step cost cut. All parts take ~12 min on one H100, more
# than one device call may run, so name the parts (default: all):
#
#     bash benchmarks/gpu_run5.sh tests extract folder    # then: bash benchmarks/gpu_run5.sh nonfinite engine
#
# Results under $OUT (default /tmp/gpu_out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
PARTS=" ${*:-tests extract nonfinite folder engine} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
want tests && timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -5
want extract && timeout -k 10 120 python3 benchmarks/gpu_throughput.py --only resnet50_extract --budget-s 110 \
  --out "$OUT/extract.json" 2>&1 | tee "$OUT/extract.log" | tail -6
# the fast recipe (which uses stop) on CIFAR-shaped synthetic data, without compile (minutes of it per run)
want nonfinite && timeout -k 10 300 python3 benchmarks/nonfinite_sync.py --launch launch/single_gpu.yaml \
  --repeats 3 --config configs/cifar10_fast.yaml --json "$OUT/nonfinite.json" data.name=synthetic \
  data.root=null data.image_size=32 data.batch_size=128 data.eval_batch_size=1000 train.epochs=6 \
  train.compile=false log.every_n_steps=5 2>&1 | tee "$OUT/nonfinite.log" | tail -3
# image folders: decoding in 8 workers vs data.decode=device (nvJPEG + resize on the GPU)
want folder && timeout -k 10 150 python3 benchmarks/folder_pipeline.py --images 4000 --workers 8 --repeats 3 \
  --batch 256 2>&1 | tee "$OUT/folder_pipeline.log" | tail -9
want engine && timeout -k 10 100 python3 benchmarks/engine_vs_plain.py --models lenet,linear --batch 256 \
  --batches 200 --repeats 3 --json "$OUT/engine_vs_plain.json" 2>&1 | tee "$OUT/engine_vs_plain.log" | tail -4
echo "total ${SECONDS} s"
