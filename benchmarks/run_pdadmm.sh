#!/bin/bash
# pdADMM benchmark sequence (issue 11).  Timing commands each take the exclusive lock and are short;
# `uptime` is recorded next to every result (benchmarks/results/pdadmm_uptime.txt).
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
R=benchmarks/results
B="python benchmarks/bench_pdadmm.py"
MPI=${MPIEXEC:-mpiexec}
mkdir -p $R
stamp() { echo "$1: $(uptime)" >> $R/pdadmm_uptime.txt; }
x() { flock -x /work/bench.lock timeout 600 "$@"; }
stamp "t1 before";  x $B iter --threads 1 --out $R/pdadmm_iter_t1.json > /dev/null; stamp "t1 after"
stamp "t2 before";  x $B iter --threads 2 --no-floor --out $R/pdadmm_iter_t2.json > /dev/null; stamp "t2 after"
stamp "p2 before";  x $MPI -n 2 $B iter --no-floor --out $R/pdadmm_iter_p2.json > /dev/null; stamp "p2 after"
stamp "msg before"; x $MPI -n 2 $B msg --out $R/pdadmm_msg.json > /dev/null; stamp "msg after"
stamp "784 before"; x $B iter --features 784 --out $R/pdadmm_iter_784_t1.json > /dev/null; stamp "784 after"
# bytes per iteration: deterministic (no timing), 3 ranks = one rank per layer
flock -s /work/bench.lock $MPI -n 3 $B iter --iters 1 --no-floor --out $R/pdadmm_bytes_p3.json > /dev/null
flock -s /work/bench.lock $MPI -n 3 $B iter --iters 1 --no-floor --quantize --out $R/pdadmm_bytes_q_p3.json > /dev/null
$B model --iter $R/pdadmm_iter_t1.json --msg $R/pdadmm_msg.json --out $R/pdadmm_model.json > /dev/null
echo done >> $R/pdadmm_uptime.txt
