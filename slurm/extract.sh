#!/usr/bin/env bash
# Extract features on 1..N nodes: sbatch [-N NODES] slurm/extract.sh CONFIG [section.key=value ...]
#
#SBATCH --job-name=toolkit-extract
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
##SBATCH --partition=gpu
##SBATCH --gpus-per-node=8
#
# Shard k of the dataset goes to rank k % world size; finished shards are kept, so a requeued
# or resubmitted job (same run.dir) only does what is missing. Without run.dir or model.run the
# output is runs/slurm/extract-JOBID/features. On SIGUSR1 the job requeues itself: the shards
# written so far stay, the rest are redone on restart.
set -uo pipefail
source "${SLURM_SUBMIT_DIR:?run this through sbatch}/slurm/lib.sh"

take_config "sbatch slurm/extract.sh CONFIG [section.key=value ...]" "$@"
case " $* " in
  *" run.dir="*|*" model.run="*) ;;
  *) ARGS+=("run.dir=runs/slurm/extract-$(job_ref)") ;;
esac
OUT=$("$PY" -c 'import sys; from toolkit.config import load_extract_config; from toolkit.extract import features_dir
print(features_dir(load_extract_config(sys.argv[1], sys.argv[2:])))' "$CONFIG" "${ARGS[@]}" 2>&1) \
  || fail "$(echo "$OUT" | tail -n1 | sed 's/^[A-Za-z]*Error: //')"
plan_processes
run_step toolkit/extract.py "$OUT" --config "$CONFIG" "${ARGS[@]}"
requeue_if_preempted "$OUT/meta.json"
exit "$STEP_RC"
