#!/usr/bin/env bash
# Extract features on 1..N nodes: sbatch [-N NODES] slurm/extract.sh CONFIG [section.key=value ...]
#
#SBATCH --job-name=toolkit-extract
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
##SBATCH --cpus-per-task=16
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
# written so far stay, the rest are redone on restart. CPUs: as slurm/train.sh (none requested
# here; sbatch --cpus-per-task=N for more). Exit codes: 0 done (or requeued), 2 bad input (never
# requeued), else the step's.
set -uo pipefail
source "${SLURM_SUBMIT_DIR:?run this through sbatch}/slurm/lib.sh"

take_config "sbatch slurm/extract.sh CONFIG [section.key=value ...]" "$@"
case " $* " in
  *" run.dir="*|*" model.run="*) ;;
  *) ARGS+=("run.dir=runs/slurm/extract-$(job_ref)") ;;
esac
# Check everything here, once, before any node starts: the config, the paths, the model with its
# weights (model.run / model.pretrained) loaded, the data, the sizes and one forward pass. Bad input
# fails in one line (the `error:` toolkit.extract prints), exit 2, no requeue. It prints the
# features directory.
OUT=$("$PY" -m toolkit.extract --check-only --config "$CONFIG" "${ARGS[@]}") || exit 2
OUT=$(tail -n1 <<<"$OUT")
plan_processes
run_step toolkit/extract.py "$OUT" --config "$CONFIG" "${ARGS[@]}"
requeue_if_preempted "$OUT/meta.json"
exit "$STEP_RC"
