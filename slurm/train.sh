#!/usr/bin/env bash
# Train on 1..N nodes: sbatch [-N NODES] slurm/train.sh CONFIG [section.key=value ...]
#
# Edit these defaults, or override them on the sbatch line (-N 4 --gpus-per-node 8 ...).
#SBATCH --job-name=toolkit-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
##SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
##SBATCH --partition=gpu
##SBATCH --gpus-per-node=8
#
# CPUs: none requested here, so the job starts on any partition (a fixed --cpus-per-task larger
# than the nodes would leave it PENDING for good); each node gets SLURM's default and the job
# uses what it got (SLURM_CPUS_ON_NODE: threads per process). More: sbatch --cpus-per-task=N.
#
# One task per node runs `accelerate launch` (GPU nodes: one process per GPU; CPU nodes: gloo).
# The run directory is keyed by the job id (runs/slurm/train-JOBID, or run.dir=... given here),
# so a requeued job continues the same run. 120 s before the time limit, or on
# `scancel --signal=USR1 --batch JOBID`, every rank saves a checkpoint, the job requeues itself
# and resumes. Exit codes: 0 done (or requeued), 2 bad input (never requeued), else the step's.
set -uo pipefail
source "${SLURM_SUBMIT_DIR:?run this through sbatch}/slurm/lib.sh"

take_config "sbatch slurm/train.sh CONFIG [section.key=value ...]" "$@"
RUN_DIR="runs/slurm/train-$(job_ref)"
for a in "${ARGS[@]}"; do case $a in run.dir=*) RUN_DIR=${a#run.dir=} ;; esac; done
ARGS+=("run.dir=$RUN_DIR" "train.resume=auto")
# Check the config here, once, before any node starts: a typo fails in one line, not N.
RESOLVED=$("$PY" -m toolkit.train --config "$CONFIG" "${ARGS[@]}" --print-config) || exit 2
WORKERS=$(awk '/^data:/ {d = 1; next} /^[^ ]/ {d = 0} d && $1 == "num_workers:" {print $2}' <<<"$RESOLVED")
plan_processes "${WORKERS:-0}"
run_step toolkit/train.py "$RUN_DIR" --config "$CONFIG" "${ARGS[@]}"
requeue_if_preempted "$RUN_DIR/summary.json"
exit "$STEP_RC"
