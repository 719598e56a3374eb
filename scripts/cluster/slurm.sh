#!/usr/bin/env bash
# A throwaway Slurm (munged + slurmctld + slurmd) for the cluster checks.
#   scripts/cluster/slurm.sh start DIR     write DIR/slurm.conf, start the daemons, wait for the node
#   scripts/cluster/slurm.sh start DIR --vnodes VNDIR
#                                          one slurmd on every node of the emulated cluster VNDIR
#                                          (scripts/cluster/vnodes.sh): slurmctld on vnode0, nodes
#                                          vnode0..vnodeK-1, each with its own SLURM_NODEID. Clients
#                                          run on a node: VNDIR/agent vnode0 "sbatch -N 2 ..."
#   scripts/cluster/slurm.sh stop DIR      cancel every job, stop the daemons started from DIR
# Clients need `export SLURM_CONF=DIR/slurm.conf`.  Everything (state, spool, logs, the munge
# socket) lives under DIR, on non-default ports, so nothing system-wide is configured.
# Process tracking is proctrack/linuxproc and task/none: no cgroups, no CPU binding, nothing
# touches processes outside the jobs.  The node claims ${MPIDL_SLURM_CPUS:-8} CPUs whatever the
# machine has (SlurmdParameters=config_overrides), so 8-rank jobs run on 2 cores.
# MpiDefault=none, as Debian's slurm-wlm ships: srun needs --mpi=pmi2 for MPICH.
# Job ids start at ${MPIDL_SLURM_FIRST_JOB_ID}, default from the clock, not at 1: under
# srun --mpi=pmi2 MPICH names its shared-memory segment after the job id, and a fresh Slurm that
# reuses ids 1, 2, ... attaches the segments that killed jobs of an earlier instance leaked, so its
# MPI_Init fails or hangs (docs/clusters.md, "Stale MPICH segments").
set -euo pipefail
cmd=${1:?usage: slurm.sh start|stop DIR [--vnodes VNDIR]}
dir=$(realpath -m "${2:?usage: slurm.sh start|stop DIR [--vnodes VNDIR]}")
vndir=""
if [ "${3:-}" = --vnodes ]; then
    vndir=$(realpath -m "${4:?--vnodes needs the DIR of a running emulated cluster}")
    [ -f "$vndir/vnodes.env" ] || { echo "[slurm] $vndir holds no running emulated cluster (scripts/cluster/vnodes.sh start K $vndir)" >&2; exit 2; }
fi

stop_pid() {  # stop_pid PIDFILE: TERM, then KILL after 10 s (only the process the file names)
    local f=$1 pid i
    [ -f "$f" ] || return 0
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

case $cmd in
start)
    mkdir -p "$dir"/{state,spool,munge,log}
    chmod 700 "$dir/munge"
    host=$(hostname -s)
    cpus=${MPIDL_SLURM_CPUS:-8}
    port=${MPIDL_SLURM_PORT:-6917}
    # seconds since 2026 x 8: a later start begins above every id an earlier one used, unless
    # that one submitted more than 8 jobs per second it ran (below Slurm's MaxJobId 67043328
    # until 2028)
    first_job=${MPIDL_SLURM_FIRST_JOB_ID:-$(( ($(date +%s) - 1767225600) * 8 % 67000000 + 1 ))}
    ctl_host="$host(127.0.0.1)"
    nodes="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN"
    per_node=""
    if [ -n "$vndir" ]; then
        # shellcheck disable=SC1091
        . "$vndir/vnodes.env"
        ctl_host="vnode0(10.201.$VN_ID.1)"
        nodes=$(for i in $(seq 0 $((VN_K - 1))); do
            echo "NodeName=vnode$i NodeAddr=10.201.$VN_ID.$((i + 1)) CPUs=$cpus State=UNKNOWN"; done)
        per_node="-%n"
        ln -sfn "$vndir/agent" "$dir/vnodes-agent"
        mkdir -p "$dir/spool/"; for i in $(seq 0 $((VN_K - 1))); do mkdir -p "$dir/spool/vnode$i"; done
    fi
    cat > "$dir/slurm.conf" <<CONF
ClusterName=mpidl-ci
FirstJobId=$first_job
SlurmctldHost=$ctl_host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket=$dir/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=15
MinJobAge=600
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool${per_node:+/%n}
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd$per_node.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd$per_node.log
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    key=${MUNGE_KEY:-/etc/munge/munge.key}
    if [ ! -s "$key" ]; then  # the munge package creates one; make a private one if it did not
        key=$dir/munge/munge.key
        [ -s "$key" ] || { dd if=/dev/urandom bs=1 count=1024 of="$key" 2>/dev/null; chmod 400 "$key"; }
    fi
    munged --force --socket="$dir/munge/munge.socket" --key-file="$key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
    export SLURM_CONF=$dir/slurm.conf
    if [ -z "$vndir" ]; then
        slurmctld -f "$SLURM_CONF" -c
        slurmd -f "$SLURM_CONF" -c
        on() { "$@"; }
        want=1
    else
        # every daemon on its node: slurmctld on vnode0, one slurmd per node named after it
        "$vndir/agent" vnode0 "slurmctld -f $SLURM_CONF -c"
        for i in $(seq 0 $((VN_K - 1))); do "$vndir/agent" "vnode$i" "slurmd -f $SLURM_CONF -c -N vnode$i"; done
        on() { "$vndir/agent" vnode0 "SLURM_CONF=$SLURM_CONF $*"; }
        want=$VN_K
        host="vnode0..vnode$((VN_K - 1))"
    fi
    for _ in $(seq 60); do
        if [ "$(on sinfo -h -N -o '%T' 2>/dev/null | grep -cx idle)" -ge "$want" ]; then
            echo "[slurm] up: node(s) $host with $cpus CPUs each, SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 1
    done
    echo "[slurm] the node did not come up; logs in $dir/log:" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    exit 1
    ;;
stop)
    if [ -f "$dir/slurm.conf" ] && [ -f "$dir/slurmctld.pid" ]; then
        if grep -q "^SlurmctldHost=vnode0(" "$dir/slurm.conf"; then   # started with --vnodes
            vn_agent=$(ls "$dir"/vnodes-agent 2>/dev/null || true)
            [ -n "$vn_agent" ] && "$vn_agent" vnode0 "SLURM_CONF=$dir/slurm.conf scancel --user=root --full" 2>/dev/null || true
        else
            SLURM_CONF=$dir/slurm.conf scancel --user=root --full 2>/dev/null || true
        fi
        sleep 1
    fi
    for f in "$dir"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munged.pid"
    echo "[slurm] stopped ($dir)"
    ;;
*)
    echo "usage: slurm.sh start|stop DIR" >&2; exit 2 ;;
esac
