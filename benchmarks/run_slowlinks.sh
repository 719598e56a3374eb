#!/usr/bin/env bash
# Issue 29, part 3: the shipped study (jobs/studies/fmnist_all.toml: 7 methods x 3 seeds, 12 s of
# wall time per run) at 4 ranks, run
#   1. on one node (plain mpiexec, shared memory),
#   2. on 4 emulated nodes x 1 rank with links shaped to 1 Gbit/s,
#   3. the same nodes at 100 Mbit/s,
#   4. the same nodes unshaped (veth speed: the TCP path without a bandwidth limit),
# each into its own folder under OUT (default studies/slowlinks). Every report.md records the
# link rate (MPIDL_LINK_RATE, set by the cluster's mpiexec) and the load average of each run.
# Needs root for the emulated nodes (scripts/cluster/vnodes.sh). About 7 min per setting on an
# idle 2-core machine. Run it on an otherwise idle machine: the budget is wall time.
#   bash benchmarks/run_slowlinks.sh [OUT] [SETTINGS]      SETTINGS: any of onenode,1gbit,100mbit,unshaped
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${1:-studies/slowlinks}
SETTINGS=${2:-onenode,1gbit,100mbit,unshaped}
STUDY=${STUDY:-jobs/studies/fmnist_all.toml}
PY=$ROOT/.venv/bin/python
export OMP_NUM_THREADS=1
stamp() { echo "[slowlinks] $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $*"; }
if [[ ,$SETTINGS, == *,onenode,* ]]; then
    stamp "one node, 4 ranks"
    "$ROOT/.venv/bin/mpiexec" -n 4 "$PY" -m mpidl compare "$STUDY" --out "$OUT/onenode"
fi
DIR=$(mktemp -d /tmp/mpidl-slowlinks.XXXXXX)
trap 'bash scripts/cluster/vnodes.sh stop "$DIR/c" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
started=0
for rate in 1gbit 100mbit unshaped; do
    [[ ,$SETTINGS, == *,$rate,* ]] || continue
    if [ $started = 0 ]; then
        bash scripts/cluster/vnodes.sh start 4 "$DIR/c" $([ $rate = unshaped ] || echo --rate $rate)
        started=1
    else
        bash scripts/cluster/vnodes.sh rate "$DIR/c" $rate
    fi
    stamp "4 emulated nodes x 1 rank, links $rate"
    "$DIR/c/mpiexec" -n 4 "$PY" -m mpidl compare "$STUDY" --out "$OUT/$rate"
done
stamp "done"
