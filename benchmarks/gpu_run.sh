#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine from the repo root (carry the ignored .whl/ folder):
#
#     bash benchmarks/gpu_run.sh        # ~8 min on one H100; results under $OUT (default /tmp/gpu_out)
#
# 1. installs the wheels in .whl/ (omegaconf, which the machine lacks) into /tmp/site, offline;
# 2. prints nvidia-smi and the versions;
# 3. runs tests/test_gpu.py (log: $OUT/gpu_tests.log; a failure does not stop the script);
# 4. runs benchmarks/gpu_throughput.py (log: $OUT/gpu_bench.log, results: $OUT/gpu_throughput.json)
#    with what is left of a 530 s budget: workloads that would not fit are skipped, listed as such.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-530}  # the whole script stays under 9 minutes

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "pip failed; unpacking the wheels instead"; for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done; }
export PYTHONPATH=/tmp/site:$PWD

nvidia-smi
python3 - <<'PY'
import sys, torch, torchvision, accelerate, omegaconf
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), torchvision {torchvision.__version__}, accelerate {accelerate.__version__}, "
      f"omegaconf {omegaconf.__version__}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
import toolkit.engine, toolkit.extract  # everything the benchmark needs imports
PY

timeout -k 10 240 python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
echo "tests/test_gpu.py exit status ${PIPESTATUS[0]} (after ${SECONDS} s)"

REMAIN=$((TOTAL_S - SECONDS))
PYTHONUNBUFFERED=1 timeout -k 10 "$REMAIN" python3 benchmarks/gpu_throughput.py --out "$OUT/gpu_throughput.json" \
  --budget-s "$((REMAIN - 15))" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
echo "gpu_throughput.py exit status ${PIPESTATUS[0]} (script total ${SECONDS} s)"
