#!/bin/bash
# pdADMM benchmark sequence (issue 11).  Timing commands each take the exclusive lock and are short;
# `uptime` is recorded next to every result (benchmarks/results/pdadmm_uptime<TAG>.txt).
# Every file name carries TAG (default: _<date>T<time> of the start), so a rerun never overwrites
# the results docs/bench_pdadmm.md cites (the first version's files have no tag, the second's _v2).
set -u
cd "$(dirname "$0")/.."
# a lock shared by everyone timing on this machine (timings take it exclusively): BENCH_LOCK
LOCK=${BENCH_LOCK:-/work/bench.lock}; [ -d "$(dirname "$LOCK")" ] || LOCK=/tmp/mpidl-bench.lock
export OMP_NUM_THREADS=1
R=benchmarks/results
B="python benchmarks/bench_pdadmm.py"
MPI=${MPIEXEC:-mpiexec}
mkdir -p $R
T=${TAG:-_$(date +%Y%m%dT%H%M)}
stamp() { echo "$1: $(uptime)" >> $R/pdadmm_uptime$T.txt; }
x() { flock -x "$LOCK" timeout 600 "$@"; }
stamp "t1 before";  x $B iter --threads 1 --out $R/pdadmm_iter_t1$T.json > /dev/null; stamp "t1 after"
stamp "t2 before";  x $B iter --threads 2 --no-floor --out $R/pdadmm_iter_t2$T.json > /dev/null; stamp "t2 after"
stamp "p2 before";  x $MPI -n 2 $B iter --no-floor --out $R/pdadmm_iter_p2$T.json > /dev/null; stamp "p2 after"
stamp "msg before"; x $MPI -n 2 $B msg --out $R/pdadmm_msg$T.json > /dev/null; stamp "msg after"
stamp "784 before"; x $B iter --features 784 --out $R/pdadmm_iter_784_t1$T.json > /dev/null; stamp "784 after"
# bytes per iteration: deterministic (no timing), 3 ranks = one rank per layer
flock -s "$LOCK" $MPI -n 3 $B iter --iters 1 --no-floor --out $R/pdadmm_bytes_p3$T.json > /dev/null
flock -s "$LOCK" $MPI -n 3 $B iter --iters 1 --no-floor --quantize --out $R/pdadmm_bytes_q_p3$T.json > /dev/null
$B model --iter $R/pdadmm_iter_t1$T.json --msg $R/pdadmm_msg$T.json --out $R/pdadmm_model$T.json > /dev/null
echo done >> $R/pdadmm_uptime$T.txt
