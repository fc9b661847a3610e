#!/usr/bin/env bash
# Every GPU check, on a lent GPU machine, from the repo root (carry the ignored .whl/ folder):
#
#     bash benchmarks/gpu.sh                     # lists the parts (also --help)
#     bash benchmarks/gpu.sh tests extract       # runs these parts, in this order
#
# Each part fits in one device call (10 minutes); name several when their limits add up to less.
# Results under $OUT (default /tmp/gpu_out): <part>.log, and <part>.json where the part writes one.
# First the wheels in .whl/ (what the machine lacks: omegaconf, pydantic, hjson, deepspeed; see
# ../shared/FACTS.md, "The lent GPU machines") are installed into /tmp/site, offline, and one line
# says which GPU and versions ran. A failing part does not stop the others; the exit status is 1
# if any part failed or ran out of time. Results: docs/benchmarks.md.
set -uo pipefail

# part | time limit (s) | what it measures
PARTS=(
  "tests|330|tests/test_gpu.py (DeepSpeed ZeRO-2/3, nvJPEG decode, ShardWriter, ... on one GPU)"
  "extract|120|ResNet-50 extraction images/s, 224 px, batch 256, fp32 vs bf16 + channels_last (gpu_throughput.py)"
  "r50-train|300|ResNet-50 training images/s, 224 px, batch 256, fp32 vs bf16 + channels_last + compile (gpu_throughput.py)"
  "r18-train|180|ResNet-18 (CIFAR) training images/s, 32 px, batch 512, 6 epochs, fp32 vs fast (gpu_throughput.py)"
  "nonfinite|300|train.nonfinite=skip vs stop on configs/cifar10_fast.yaml, synthetic CIFAR-shaped data, no compile"
  "folder|150|image folders: decoding in 8 workers vs data.decode=device (nvJPEG + resize on the GPU) vs prepared"
  "engine|100|the engine vs a plain loop, LeNet and one Linear layer (per-step cost), batch 256"
  "engine-r18|100|the engine vs a plain loop, ResNet-18 (CIFAR), batch 256"
  "loader|100|the device-resident loader vs torchvision's per-sample PIL pipeline (2 workers)"
  "fast|200|configs/cifar10_fast.yaml vs the same model trained fp32 eager with a DataLoader (benchmarks/fast_recipe.py)"
  "train-peers|200|ResNet-50 224 px batch 256 bf16 channels_last, data on the device: plain loop vs Lightning Fabric vs the toolkit (train_peers.py)"
  "extract-ceiling|150|streamed-batch check on CUDA, then extraction with the defaults (auto) vs the forward pass alone, ResNet-50 224 px batch 256 (fast_defaults.py)"
  "auto-defaults|240|configs/cifar10_resnet18.yaml on synthetic CIFAR-shaped data: precision=no channels_last=false vs the auto defaults (fast_defaults.py)"
)

field() { local IFS='|'; local -a f; read -r -a f <<<"$1"; echo "${f[$2]}"; }
limit_of() { local p; for p in "${PARTS[@]}"; do [[ $(field "$p" 0) == "$1" ]] && { field "$p" 1; return 0; }; done; return 1; }

usage() {
  echo "usage: bash benchmarks/gpu.sh PART...   (results under \$OUT, default /tmp/gpu_out)"
  echo
  printf '  %-15s %8s  %s\n' part "limit" "what"
  local p
  for p in "${PARTS[@]}"; do printf '  %-15s %6s s  %s\n' "$(field "$p" 0)" "$(field "$p" 1)" "$(field "$p" 2)"; done
  echo
  echo "A device call runs at most 600 s: name parts whose limits add up to less (plus ~30 s of setup)."
}

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 0
fi
total=0
for part in "$@"; do
  lim=$(limit_of "$part") || { echo "gpu.sh: unknown part '$part'" >&2; usage >&2; exit 2; }
  total=$((total + lim))
done
if (( total > 570 )); then
  echo "gpu.sh: warning: the parts' limits add up to ${total} s, more than one 10-minute device call" >&2
fi

OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"

# --- setup: the missing packages, offline, into /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "pip failed; unpacking the wheels instead"; for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done; }
else
  echo "gpu.sh: no wheels in .whl/ (carry it): omegaconf and the rest may be missing" >&2
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv
python3 - <<'PY'
import sys, torch, torchvision, accelerate, omegaconf
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), torchvision {torchvision.__version__}, accelerate {accelerate.__version__}, "
      f"omegaconf {omegaconf.__version__}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
import toolkit.engine, toolkit.extract  # everything the parts need imports
PY

# --- the parts: run_part NAME LIMIT TAIL_LINES -- COMMAND...  (the log keeps everything)
run_part() {
  local name=$1 lim=$2 lines=$3 start=$SECONDS
  shift 4
  echo "=== $name (limit ${lim} s)"
  timeout -k 10 "$lim" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^\s*$' | tail -n "$lines"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit status $rc after $((SECONDS - start)) s"
  (( rc == 0 )) || failed+=("$name($rc)")
}

failed=()
for part in "$@"; do
  lim=$(limit_of "$part")
  case $part in
    tests)
      run_part tests "$lim" 15 -- python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
    extract)
      run_part extract "$lim" 8 -- python3 benchmarks/gpu_throughput.py --only resnet50_extract \
        --budget-s $((lim - 10)) --out "$OUT/extract.json" ;;
    r50-train)
      run_part r50-train "$lim" 8 -- python3 benchmarks/gpu_throughput.py --only resnet50_train \
        --budget-s $((lim - 10)) --out "$OUT/r50-train.json" ;;
    r18-train)
      run_part r18-train "$lim" 8 -- python3 benchmarks/gpu_throughput.py --only resnet18_train --r18-epochs 6 \
        --budget-s $((lim - 10)) --out "$OUT/r18-train.json" ;;
    nonfinite)
      # the fast recipe (which uses stop) on CIFAR-shaped synthetic data, without compile (minutes of it per run)
      run_part nonfinite "$lim" 4 -- python3 benchmarks/nonfinite_sync.py --launch launch/single_gpu.yaml \
        --repeats 3 --config configs/cifar10_fast.yaml --json "$OUT/nonfinite.json" data.name=synthetic \
        data.root=null data.image_size=32 data.batch_size=128 data.eval_batch_size=1000 train.epochs=6 \
        train.compile=false log.every_n_steps=5 ;;
    folder)
      run_part folder "$lim" 10 -- python3 benchmarks/folder_pipeline.py --images 4000 --workers 8 --repeats 3 \
        --batch 256 ;;
    engine)
      run_part engine "$lim" 5 -- python3 benchmarks/engine_vs_plain.py --models lenet,linear --batch 256 \
        --batches 200 --repeats 3 --json "$OUT/engine.json" ;;
    engine-r18)
      run_part engine-r18 "$lim" 4 -- python3 benchmarks/engine_vs_plain.py --models resnet18_cifar --batch 256 \
        --batches 100 --repeats 3 --json "$OUT/engine-r18.json" ;;
    loader)
      run_part loader "$lim" 5 -- python3 benchmarks/loader_vs_pil.py --repeats 3 --images 8192 \
        --json "$OUT/loader.json" ;;
    fast)
      run_part fast "$lim" 8 -- python3 benchmarks/fast_recipe.py --epochs 5 --out "$OUT/fast.json" ;;
    train-peers)
      run_part train-peers "$lim" 6 -- python3 benchmarks/train_peers.py --repeats 3 --json "$OUT/train-peers.json" ;;
    extract-ceiling)
      # first: streamed batches equal the whole-set copy on CUDA (skipped on the CPU), then the rates
      run_part extract-ceiling "$lim" 8 -- bash -c "python3 -m pytest -q -p no:cacheprovider \
        tests/test_fast_defaults.py -k cuda && python3 benchmarks/fast_defaults.py extract-ceiling --repeats 3 \
        --json '$OUT/extract-ceiling.json'" ;;
    auto-defaults)
      run_part auto-defaults "$lim" 6 -- python3 benchmarks/fast_defaults.py auto-defaults --repeats 2 \
        --json "$OUT/auto-defaults.json" ;;
  esac
done

echo "total ${SECONDS} s; failed: ${failed[*]:-none}"
(( ${#failed[@]} == 0 ))
