#!/usr/bin/env bash
# A one-host SLURM cluster for testing launch/slurm_multinode.sh for real (tests/test_slurm.py):
#   launch/slurm_local.sh start DIR   # munged, slurmctld and slurmd for this host; config and state in DIR
#   export SLURM_CONF=DIR/slurm.conf  # then sbatch / squeue / scontrol talk to it
#   launch/slurm_local.sh stop DIR    # stop the three daemons it started (by their pid files)
# Finds Debian's slurm-wlm and munge, or installs them with apt-get when run as root. The node advertises 32
# CPUs and 8 GPUs whatever the hardware (SlurmdParameters=config_overrides, a count-only gres.conf) so that
# slurm_multinode.sh's #SBATCH lines are accepted unchanged; jobs override --cpus-per-task and GPUS_PER_NODE.
# Requeued jobs may start 10 s after the requeue (cred_expire=10; SLURM's default is 120 s).
# Exit status 3, with the reason on stderr, where SLURM cannot start here (not root and not installed, no
# apt-get, a daemon that does not come up): callers skip on it.
set -uo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi

cannot() { echo "SLURM cannot start here: $*" >&2; exit 3; }

stop() {
  # cancel this cluster's jobs first, so that no job's processes outlive the daemons
  if [ -f "$dir/slurm.conf" ] && [ -f "$dir/slurmctld.pid" ]; then
    jobs=$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
      SLURM_CONF="$dir/slurm.conf" scancel $jobs 2>/dev/null
      for _ in $(seq 60); do
        [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %i 2>/dev/null)" ] && break
        sleep 1
      done
    fi
  fi
  for name in slurmd slurmctld munged; do
    if [ -f "$dir/$name.pid" ]; then
      pid=$(cat "$dir/$name.pid")
      kill "$pid" 2>/dev/null
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null
      rm -f "$dir/$name.pid"
    fi
  done
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

missing=""
for tool in munged munge slurmctld slurmd sbatch scontrol squeue; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  [ "$(id -u)" = 0 ] || cannot "missing$missing and not root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null 2>&1 || cannot "missing$missing and no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >"$dir.apt.log" 2>&1 \
    || cannot "apt-get install slurm-wlm munge failed (see $dir.apt.log)"
fi
[ "$(id -u)" = 0 ] || cannot "the daemons run as root here (SlurmUser=root); run as root"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chmod 755 "$dir/munge"
host=$(hostname -s)

# munge: a fresh key and a private socket, so an existing munged (if any) is left alone.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
socket="$dir/munge/munge.socket"
munged --force --socket="$socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munged.pid" \
  --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed" || cannot "munged did not start ($dir/munged.log)"
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
munge -n -S "$socket" | unmunge -S "$socket" >/dev/null 2>&1 || cannot "munge does not round-trip a credential"

cat >"$dir/slurm.conf" <<EOF
ClusterName=mmebm-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=32 RealMemory=4000 Gres=gpu:8 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
mkdir -p "$dir/dev"
# character devices (those of /dev/null) where mknod is allowed: slurmd checks the files, nothing opens them
for i in 0 1 2 3 4 5 6 7; do mknod "$dir/dev/gpu$i" c 1 3 2>/dev/null || : >"$dir/dev/gpu$i"; done
echo "NodeName=$host Name=gpu File=$dir/dev/gpu[0-7]" >"$dir/gres.conf"
export SLURM_CONF="$dir/slurm.conf"

slurmctld -c -f "$SLURM_CONF" || { stop; cannot "slurmctld did not start ($dir/slurmctld.log)"; }
slurmd -f "$SLURM_CONF" || { stop; cannot "slurmd did not start ($dir/slurmd.log)"; }
for _ in $(seq 100); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null)
  case "$state" in idle*|mix*|alloc*) echo "SLURM up: node $host $state, SLURM_CONF=$SLURM_CONF"; exit 0 ;; esac
  sleep 0.2
done
stop
cannot "node $host did not become idle (state '${state:-none}'; see $dir/slurmctld.log, $dir/slurmd.log)"
