#!/usr/bin/env bash
# Sweep on 1..N nodes: sbatch [-N NODES] slurm/sweep.sh --space NAME [toolkit.tune options] [section.key=value ...]
#
# Edit these defaults, or override them on the sbatch line (-N 4 --gpus-per-node 8 ...).
#SBATCH --job-name=toolkit-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
##SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --no-requeue
##SBATCH --partition=gpu
##SBATCH --gpus-per-node=8
#
# A Ray cluster inside the allocation: the head on the first node (in the batch shell), a Ray
# worker node on each other node (one srun step), each offering its node's CPUs
# (SLURM_CPUS_ON_NODE: none are requested here, so that the job starts on any partition; SLURM's
# default, or sbatch --cpus-per-task=N) and GPUs; then `python -m toolkit.tune --address HEAD:PORT`
# with the options given here. Ray's ports come from the job id (a window of 50 in 10000-19999),
# its files go to /tmp/ray-JOBID-NODE (TOOLKIT_RAY_TMP=DIR for another root), no dashboard. When the sweep
# ends, and on scancel or the time limit, every node's Ray is stopped through its own
# `ray start --block` (never `ray stop`: it stops every Ray instance on the machine). A cancelled
# sweep continues with `sbatch slurm/sweep.sh --resume --name NAME` (the log says NAME).
# Exit codes: 0 done, 1 a trial failed after its retries, 2 bad input (never requeued), else a
# Ray or SLURM failure.
set -uo pipefail
source "${SLURM_SUBMIT_DIR:?run this through sbatch}/slurm/lib.sh"

USAGE="sbatch [-N NODES] slurm/sweep.sh --space NAME [toolkit.tune options] [section.key=value ...]"
[ $# -gt 0 ] || fail "usage: $USAGE"
ARGS=("$@")
NAME="" RESUME=0 STORAGE_ARG=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case ${ARGS[i]} in
    --address|--address=*|--num-cpus|--num-cpus=*)
      fail "${ARGS[i]%%=*}: slurm/sweep.sh sets up the Ray cluster itself; request nodes and CPUs" \
           "from SLURM (-N, --cpus-per-task)" ;;
    --name) NAME=${ARGS[i + 1]:-} ;;
    --name=*) NAME=${ARGS[i]#--name=} ;;
    --storage) STORAGE_ARG=" --storage ${ARGS[i + 1]:-}" ;;
    --storage=*) STORAGE_ARG=" --storage ${ARGS[i]#--storage=}" ;;
    --resume) RESUME=1 ;;
  esac
done
if [ -z "$NAME" ] && [ "$RESUME" -eq 0 ]; then NAME="sweep-$(job_ref)"; ARGS+=(--name "$NAME"); fi

# Ray's ports: a window of 50 per job id (GCS, client server, dashboard, then 6 per node). The
# emulated cluster's "nodes" share one host, so each node's ports are offset by its index in the
# job (7 slots; real nodes are separate hosts). Workers take free ports from the OS.
RAY_BASE=$((10000 + SLURM_JOB_ID % 200 * 50))
node_ip() {  # a node's NodeAddr, as an IPv4 address where it is a name (Ray wants an address)
  local a b; a=$(scontrol show node "$1" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  if [[ ! $a =~ ^[0-9.]+$ && $a != *:* ]]; then
    b=$(getent ahostsv4 "$a" 2>/dev/null | awk '{print $1; exit}'); a=${b:-$a}
  fi
  echo "$a"
}
HEAD_IP=$(node_ip "$SLURMD_NODENAME")
[ -n "$HEAD_IP" ] || fail "no NodeAddr for $SLURMD_NODENAME in scontrol show node"
RAY_HEAD="$HEAD_IP:$RAY_BASE"

# Everything toolkit.tune checks (space, config, overrides, metric, name in use) is checked here,
# once, before any Ray process starts: a typo fails in one line with exit code 2.
OUT=$("$PY" -m toolkit.tune "${ARGS[@]}" --address "$RAY_HEAD" --check-only 2>&1) \
  || fail "$(echo "$OUT" | grep -v '^\s*$' | tail -n1 | sed 's/^\(python -m toolkit.tune: \)\{0,1\}error: //')"
plan_processes  # GPUS: what each Ray node offers (fails on GPUS_PER_NODE > what the node shows)

# Every Ray process inherits these. RAY_worker_niceness: Ray's default (nice 15) starves trials
# behind any other process. A token of this job only: Ray's services listen on every interface.
export RAY_worker_niceness=0 RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n'); export RAY_AUTH_TOKEN
fi
export TOOLKIT_SWEEP_JOB=$SLURM_JOB_ID  # a mark on every process of this job's Ray (tests look for it)
export PY RAY_BASE RAY_HEAD GPUS RAY_TMP_ROOT=${TOOLKIT_RAY_TMP:-/tmp}

node_index() {  # this node's index in the job (SLURM_NODEID counts within an srun step)
  local n; n=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | grep -nx "$SLURMD_NODENAME" | cut -d: -f1)
  echo $((${n:-1} - 1))
}
ray_node() {  # ray_node head|worker: this node's Ray in the foreground (`ray start --block`) until SIGTERM
  local n; n=$(node_index)
  local dir="$RAY_TMP_ROOT/ray-$SLURM_JOB_ID-$n" p=$((RAY_BASE + 3 + 6 * (n % 7)))
  local ip pid rc stopping=0
  ip=$(node_ip "$SLURMD_NODENAME")
  local args=(--block --node-ip-address "$ip" --temp-dir "$dir" --num-cpus "${SLURM_CPUS_ON_NODE:-1}"
              --num-gpus "$GPUS" --node-manager-port "$p" --object-manager-port $((p + 1))
              --dashboard-agent-listen-port $((p + 2)) --dashboard-agent-grpc-port $((p + 3))
              --runtime-env-agent-port $((p + 4)) --metrics-export-port $((p + 5))
              --min-worker-port 0 --max-worker-port 0 --disable-usage-stats --log-style record)
  if [ "$1" = head ]; then
    args+=(--head --port "$RAY_BASE" --ray-client-server-port $((RAY_BASE + 1)) --include-dashboard false
           --dashboard-host 127.0.0.1 --dashboard-port $((RAY_BASE + 2)))
  else
    args+=(--address "$RAY_HEAD")
  fi
  rm -rf "$dir"; mkdir -p "$dir"
  "$PY" -m ray.scripts.scripts start "${args[@]}" >"$dir.log" 2>&1 &
  pid=$!
  trap 'stopping=1; kill -TERM $pid 2>/dev/null' TERM INT
  while true; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
  if [ "$stopping" = 0 ]; then  # it ended by itself: say why
    echo "toolkit: Ray on $SLURMD_NODENAME ended (exit $rc); its last lines:" >&2; tail -n 20 "$dir.log" >&2
  fi
  rm -rf "$dir" "$dir.log"
  [ "$stopping" = 1 ] || return "$rc"
}
export -f node_ip node_index ray_node

HEAD_PID="" WORKERS_PID="" DRIVER_PID=""
stop_all() {  # the driver first (Tune saves the sweep's state on SIGINT), then the workers, then the head
  trap '' TERM INT
  if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    kill -INT "$DRIVER_PID" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 0.5; done
    kill -TERM "$DRIVER_PID" 2>/dev/null; wait "$DRIVER_PID" 2>/dev/null
  fi
  if [ -n "$WORKERS_PID" ]; then  # SIGTERM to the workers' step (srun would SIGKILL it; slurmstepd
    # logs "STEP ... CANCELLED" for it: filtered out of the log where srun starts)
    for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -E '\.[0-9]+$'); do
      scancel --signal=TERM "$step" 2>/dev/null
    done
    for _ in $(seq 1 60); do kill -0 "$WORKERS_PID" 2>/dev/null || break; sleep 0.5; done
    kill -TERM "$WORKERS_PID" 2>/dev/null; wait "$WORKERS_PID" 2>/dev/null
  fi
  [ -n "$HEAD_PID" ] && kill -TERM "$HEAD_PID" 2>/dev/null && wait "$HEAD_PID" 2>/dev/null
  HEAD_PID="" WORKERS_PID="" DRIVER_PID=""
}
trap 'stop_all' EXIT
trap 'echo "toolkit: job cancelled or out of time: stopping the sweep and Ray"; stop_all; exit 143' TERM
trap 'stop_all; exit 130' INT

ray_node head &
HEAD_PID=$!
HEAD_LOG=$RAY_TMP_ROOT/ray-$SLURM_JOB_ID-$(node_index).log
for _ in $(seq 1 240); do  # until the head says it is up (or has died)
  grep -q "Ray runtime started" "$HEAD_LOG" 2>/dev/null && break
  kill -0 "$HEAD_PID" 2>/dev/null || break
  sleep 0.5
done
grep -q "Ray runtime started" "$HEAD_LOG" 2>/dev/null \
  || { echo "error: the Ray head did not start on $SLURMD_NODENAME ($RAY_HEAD)" >&2; exit 1; }
WORKER_NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | grep -vx "$SLURMD_NODENAME" | paste -sd, -)
if [ "$SLURM_NNODES" -gt 1 ]; then
  srun --nodes=$((SLURM_NNODES - 1)) --ntasks=$((SLURM_NNODES - 1)) --ntasks-per-node=1 \
    --nodelist="$WORKER_NODES" bash -c 'ray_node worker' 2> >(grep -v 'STEP .* CANCELLED AT' >&2) &
  WORKERS_PID=$!
fi
"$PY" - "$RAY_HEAD" "$SLURM_NNODES" 120 <<'EOF' || { echo "error: the Ray cluster did not form" >&2; exit 1; }
import sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
want, deadline = int(sys.argv[2]), time.time() + float(sys.argv[3])
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < want:
    if time.time() > deadline:
        sys.exit(f"error: {len(alive)} of {want} Ray node(s) joined in {sys.argv[3]} s")
    time.sleep(1)
cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
print(f"toolkit: Ray cluster at {sys.argv[1]}: {len(alive)} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s)", flush=True)
EOF

echo "toolkit: sweep $NAME; to finish it after a cancel:" \
  "sbatch -N $SLURM_NNODES slurm/sweep.sh --resume --name $NAME$STORAGE_ARG"
"$PY" -m toolkit.tune "${ARGS[@]}" --address "$RAY_HEAD" &
DRIVER_PID=$!
while true; do  # wait returns early (>128) when a trapped signal arrives
  wait "$DRIVER_PID"; RC=$?
  kill -0 "$DRIVER_PID" 2>/dev/null || break
done
DRIVER_PID=""
stop_all
exit "$RC"
