#!/usr/bin/env bash
# Issue 2 benchmark: one graph mix done four ways (GraphComm.mix, the bare-MPI floor,
# MPI Allreduce, torch gloo all_reduce) at N = 2 and N = 4 ranks, ring and exponential,
# P in {1e5, 1e6, 4e6}, float32 and float64.  Raw times go to benchmarks/results/mix_n*.json;
# the table is written into docs/benchmarks.md between the mix-table markers.
#   bash benchmarks/run_mix.sh                 # REPEATS=40 by default
#   REPEATS=10 bash benchmarks/run_mix.sh --sizes 1e5   # extra arguments go to `bench mix`
set -euo pipefail
cd "$(dirname "$0")/.."
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc honours OMP_NUM_THREADS
export OMP_NUM_THREADS=1
repeats="${REPEATS:-40}"
mkdir -p benchmarks/results
for n in 2 4; do
    # MPICH busy-polls while it waits.  With more ranks than cores, let a waiting
    # rank yield its core (MPIR_CVAR_ENABLE_HEAVY_YIELD=1); with a core per rank,
    # keep polling (yielding adds ~0.3 ms of latency per call).
    yield=0; [ "$n" -gt "$cores" ] && yield=1
    MPIR_CVAR_ENABLE_HEAVY_YIELD="${MPIR_CVAR_ENABLE_HEAVY_YIELD:-$yield}" \
        mpiexec -n "$n" python -m mpidl bench mix --repeats "$repeats" \
        --json "benchmarks/results/mix_n$n.json" "$@"
done
python benchmarks/assemble_mix.py benchmarks/results/mix_n2.json benchmarks/results/mix_n4.json \
    --doc docs/benchmarks.md
