# Shared by slurm/train.sh and slurm/extract.sh (sourced inside the batch job, from the
# directory sbatch was called in, which must be the toolkit checkout).
#
# What a user may set (in the environment at sbatch time, or edited here):
#   TOOLKIT_PYTHON   the Python with the toolkit installed (default: .venv/bin/python, else python3)
#   GPUS_PER_NODE    GPUs each node must have (default: what SLURM granted, else 0 = CPU processes)
#   CPU_PROCS_PER_NODE  processes per node when there is no GPU (default 1; gloo)

cd "${SLURM_SUBMIT_DIR:?run this through sbatch}" || exit 2
PY=${TOOLKIT_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

fail() { echo "error: $*" >&2; exit 2; }   # exit 2: bad input; the job is not requeued

# CONFIG is a path or a shipped config's name (digits_lenet): the CLI resolves it (toolkit.config.
# find_config), and train.sh's --print-config / extract.sh's --check-only refuse a missing one in one
# line before any node starts, so the shell does not test for a file.
take_config() {  # take_config USAGE "$@": CONFIG and ARGS (the overrides after it)
  local usage=$1; shift
  CONFIG=${1:-}
  [ -n "$CONFIG" ] || fail "usage: $usage"
  shift
  ARGS=("$@")
}

job_ref() {  # the same across requeues; array tasks each get their own
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else echo "$SLURM_JOB_ID"; fi
}

head_addr() {  # the address of the allocation's first node (NodeAddr, which may differ from its name)
  local first; first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  scontrol show node "$first" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'
}

job_port() { echo $((20000 + ${SLURM_JOB_ID} % 20000)); }

visible_gpus() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 0; }

# CPUs: the templates request none in their #SBATCH lines. sbatch reads those before the script
# runs, so a fixed --cpus-per-task larger than the partition's nodes leaves the job PENDING for
# good (Reason=PartitionConfig) with no message; without one, every node gets SLURM's default
# (1 CPU per task, or what the partition gives, e.g. DefCpuPerGPU), and `sbatch --cpus-per-task=N`
# asks for more. The job then uses what it got: SLURM_CPUS_ON_NODE, shared by the node's processes.
plan_processes() {  # plan_processes [WORKERS]: sets NPROC_NODE, NPROC, GPUS, CPUS_NODE
  GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
  local seen; seen=$(visible_gpus)
  if [ "$GPUS" -gt 0 ] && [ "$seen" -lt "$GPUS" ]; then
    fail "GPUS_PER_NODE=$GPUS but $(hostname) shows $seen GPU(s): request them (#SBATCH --gpus-per-node) or set GPUS_PER_NODE=0"
  fi
  if [ "$GPUS" -gt 0 ]; then NPROC_NODE=$GPUS; else NPROC_NODE=${CPU_PROCS_PER_NODE:-1}; fi
  NPROC=$((NPROC_NODE * SLURM_NNODES))
  CPUS_NODE=${SLURM_CPUS_ON_NODE:-1}
  local workers=${1:-0} want=$((NPROC_NODE * (1 + ${1:-0})))  # each process, and its data-loading workers
  if [ "$CPUS_NODE" -lt "$want" ]; then
    local what="$NPROC_NODE process(es)"; [ "$workers" -gt 0 ] && what+=" with $workers data.num_workers each"
    echo "toolkit: note: $CPUS_NODE CPU(s) per node for $what; they share them (more: sbatch --cpus-per-task=$want)"
  fi
  # srun since SLURM 22.05 does not always take the job's --cpus-per-task by itself
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
}

# run_step SCRIPT RUN_DIR ARGS...: one task per node, each an `accelerate launch` of SCRIPT.
# SIGUSR1 to the batch shell (#SBATCH --signal=B:USR1@T, or scancel --signal=USR1 --batch)
# writes RUN_DIR/.preempt; every rank sees it, saves at the next agreed step and exits; the
# job then requeues itself and the restarted job resumes (train.resume=auto).
PREEMPTED=0
run_step() {
  local script=$1 run_dir=$2; shift 2
  local addr port; addr=$(head_addr); port=$(job_port)
  mkdir -p "$run_dir"
  rm -f "$run_dir/.preempt"  # a request the previous job already acted on
  echo "toolkit: $SLURM_NNODES machine(s), world size $NPROC ($NPROC_NODE per node, $([ "$GPUS" -gt 0 ] && echo GPU || echo CPU/gloo)), $CPUS_NODE CPU(s) per node, main $addr:$port, run $run_dir"
  trap 'PREEMPTED=1; echo "toolkit: SIGUSR1: checkpoint and requeue"; touch "$run_dir/.preempt"' USR1
  trap 'PREEMPTED=2; touch "$run_dir/.preempt"' TERM
  # --kill-on-bad-exit: one failed node ends the step instead of leaving the rest waiting on it.
  # Threads per process (torch's intra-op pool): the node's CPUs as SLURM counts them, shared by its
  # processes (accelerate's multi-GPU launcher would give each 1); OMP_NUM_THREADS, if set, wins.
  export TOOLKIT_NPROC_NODE=$NPROC_NODE
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    t=${OMP_NUM_THREADS:-$((${SLURM_CPUS_ON_NODE:-1} / TOOLKIT_NPROC_NODE))}; [ "$t" -ge 1 ] || t=1
    exec "$0" -m accelerate.commands.launch --multi_gpu --num_machines "$1" --machine_rank "$SLURM_NODEID" \
      --num_processes "$2" --main_process_ip "$3" --main_process_port "$4" --rdzv_backend static \
      --num_cpu_threads_per_process "$t" --same_network "${@:5}"' \
    "$PY" "$SLURM_NNODES" "$NPROC" "$addr" "$port" "$script" "$@" &
  local pid=$! rc=0
  while true; do  # wait returns early (>128) when a trapped signal arrives
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  STEP_RC=$rc
}

requeue_if_preempted() {  # after run_step: DONE_FILE names what exists only when the work finished
  local done_file=$1
  if [ "$PREEMPTED" -ne 0 ] && [ ! -e "$done_file" ]; then
    echo "toolkit: requeueing job $(job_ref)"
    scontrol requeue "$(job_ref)"
    exit 0
  fi
}
