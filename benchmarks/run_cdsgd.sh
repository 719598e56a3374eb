#!/usr/bin/env bash
# Issue 4 benchmark grid: CDSGD, CDMSGD, centralized SGD, FedAvg on Fashion-MNIST, 8 agents.
# Runs the cells in stages (a cell whose results exist is skipped), then writes the docs.
#   bash benchmarks/run_cdsgd.sh            # all stages, then the report
#   bash benchmarks/run_cdsgd.sh iid        # one stage: iid | long | noniid | cnn | extra | report
# Results: runs/bench_cdsgd/<cell>/results.h5 (+ bench.json); docs: docs/bench_cdsgd.md, docs/img/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
# 8 ranks on fewer cores: let a rank waiting in MPI yield its core instead of busy-polling.
export MPIR_CVAR_ENABLE_HEAVY_YIELD=${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}
B="python benchmarks/bench_cdsgd.py"
cells() { $B run --list | cut -d: -f1 | grep -E "$1" | grep -vE "${2:-^$}" || true; }
stage() {
    case $1 in
        iid)    mpiexec -n 8 $B run $(cells '^mlp_iid_(paper|tuned)_' '_e30$|hb') ;;
        long)   mpiexec -n 8 $B run $(cells '_e30$') ;;
        cnn)    mpiexec -n 8 $B run $(cells '^cnn_') ;;  # ~2-3 min/epoch each here
        noniid) mpiexec -n 8 $B run $(cells '^mlp_dir_') ;;
        extra)  mpiexec -n 8 $B run $(cells 'hb') ;;
        report) $B report ;;
        *) echo "unknown stage $1" >&2; exit 2 ;;
    esac
}
if [ $# -eq 0 ]; then set -- iid long noniid cnn extra report; fi
for s in "$@"; do stage "$s"; done
