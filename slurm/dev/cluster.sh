#!/usr/bin/env bash
# A local emulated SLURM cluster: a real slurmctld and N slurmd daemons on this machine, each
# slurmd one "node" (Debian's slurm-wlm is built with MULTIPLE_SLURMD). For the tests, and for
# trying slurm/*.sh before the real cluster.
#
#   slurm/dev/cluster.sh up [--nodes N] [--cpus C]   install what is missing, write the config, start
#   slurm/dev/cluster.sh status                      sinfo + squeue
#   slurm/dev/cluster.sh down                        stop every daemon it started
#   slurm/dev/cluster.sh env                         the line to eval: export SLURM_CONF=...
#
# State lives in $TOOLKIT_SLURM_DIR (default /tmp/toolkit-slurm-$UID). Installing needs root
# (or sudo) and the Debian/Ubuntu package manager; the script says so and stops otherwise.
set -euo pipefail

DIR=${TOOLKIT_SLURM_DIR:-/tmp/toolkit-slurm-$(id -u)}
CONF=$DIR/slurm.conf
NODES=2
CPUS=1
PORT0=${TOOLKIT_SLURM_PORT:-17000}   # slurmctld on PORT0, slurmd node i on PORT0+i

die() { echo "cluster.sh: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else die "installing needs root or passwordless sudo: run as root, or install slurm-wlm and munge yourself"
  fi
}

install() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install slurm-wlm and munge with"
  echo "cluster.sh: installing slurm-wlm and munge (missing: ${missing[*]})" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,log,run}
  local host; host=$(hostname)
  cat >"$CONF" <<EOF
ClusterName=toolkit-dev
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT0
SlurmdPort=$((PORT0 + 1))
SlurmUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
# start batch jobs as soon as they are submitted (by default scheduling may wait up to 3 s to batch them)
SchedulerParameters=batch_sched_delay=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
MinJobAge=300
JobRequeue=1
PrologFlags=Alloc
NodeName=node[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT0 + 1))-$((PORT0 + NODES))] CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  pgrep -x munged >/dev/null && return 0
  [ -s /etc/munge/munge.key ] || as_root mungekey --create 2>/dev/null || as_root create-munge-key -f 2>/dev/null || true
  as_root mkdir -p /run/munge
  as_root munged --force
  # munged forks into the background: until its starting parent has exited, pgrep lists two
  # pids, and a pid file holding both is one argument `kill` refuses. Wait for the daemon alone.
  local pids
  for _ in $(seq 1 50); do
    pids=$(pgrep -x munged | tr '\n' ' ')
    [ "$(wc -w <<<"$pids")" = 1 ] && { echo "$pids" >"$DIR/run/munged.pid"; return 0; }
    sleep 0.1
  done
  die "munged did not start (running: ${pids:-none})"
}

up() {
  install
  if [ -f "$CONF" ] && SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q UP; then
    echo "cluster.sh: already up ($CONF)"; return 0
  fi
  write_conf
  start_munge
  as_root slurmctld -f "$CONF"
  for i in $(seq 1 "$NODES"); do as_root slurmd -f "$CONF" -N "node$i"; done
  export SLURM_CONF=$CONF
  for _ in $(seq 1 60); do  # until every node is idle
    local idle; idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge "$NODES" ] && { echo "cluster.sh: up, $NODES nodes ($CONF)"; return 0; }
    scontrol update nodename="node[1-$NODES]" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  sinfo >&2 || true
  die "nodes did not come up; see $DIR/log/"
}

down() {
  [ -f "$CONF" ] || { echo "cluster.sh: not up"; return 0; }
  SLURM_CONF=$CONF scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
  SLURM_CONF=$CONF scontrol shutdown >/dev/null 2>&1 || true
  for _ in $(seq 1 40); do pgrep -f "slurm(ctld|d) -f $CONF" >/dev/null || break; sleep 0.25; done
  pkill -f "slurm(ctld|d) -f $CONF" 2>/dev/null || true
  if [ -f "$DIR/run/munged.pid" ]; then  # only the munged this script started
    # shellcheck disable=SC2046  # one pid per word
    as_root kill $(cat "$DIR/run/munged.pid") 2>/dev/null || true
    for _ in $(seq 1 50); do  # munged takes a second or two to exit: down means down
      # shellcheck disable=SC2046
      kill -0 $(cat "$DIR/run/munged.pid") 2>/dev/null || break; sleep 0.1
    done
  fi
  rm -rf "$DIR"
  echo "cluster.sh: down"
}

cmd=${1:-}
shift || true
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) NODES=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    *) die "unknown option $1 (options: --nodes N, --cpus C)" ;;
  esac
done
case $cmd in
  up) up ;;
  down) down ;;
  status) export SLURM_CONF=$CONF; sinfo; squeue ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: cluster.sh up|down|status|env [--nodes N] [--cpus C]" ;;
esac
