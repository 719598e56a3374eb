#!/usr/bin/env bash
# Issue 5 benchmark: NEXT vs CDSGD vs centralized, 8 agents, on the same social objective.
# Raw curves go to benchmarks/results/next/*.json (not committed); the tables and plots to
# docs/bench_next.md and docs/img/next_*.png.
#   bash benchmarks/run_next.sh                 # every case below, then the report
#   bash benchmarks/run_next.sh digits_ring     # one case (see the case names below)
#   bash benchmarks/run_next.sh report          # tables and plots from the JSON files only
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
# 8 ranks on fewer cores: let a waiting rank yield its core (MPICH busy-polls otherwise)
[ "$cores" -lt 8 ] && export MPIR_CVAR_ENABLE_HEAVY_YIELD=${MPIR_CVAR_ENABLE_HEAVY_YIELD:-1}
R=benchmarks/results/next
mkdir -p "$R"
run() { mpiexec -n 8 python benchmarks/bench_next.py run "$@"; }

case_digits_ring() { run --dataset digits --topology ring --steps 400 --json $R/digits_ring.json; }
case_digits_er()   { run --dataset digits --topology erdos_renyi --p 0.4 --topo-seed 0 --steps 400 \
                         --json $R/digits_er.json; }
case_digits_ring_dirichlet() {
    run --dataset digits --partition dirichlet --alpha 0.3 --topology ring --steps 400 \
        --only centralized,cdsgd,next --json $R/digits_ring_dirichlet.json; }
fmnist() {   # a subset (250 images per agent) and a small MLP: affordable on 2 cores
    run --dataset fashion-mnist --per-agent 250 --test-samples 2000 --hidden 16 --dtype float32 \
        --steps 200 --eval-every 2 --stat-every 20 --lbfgs-iters 200 \
        --only centralized,cdsgd,next,next-l1,lbfgs \
        --central-lr 0.125,0.25,0.5,1,2 --cdsgd-lr 0.125,0.25,0.5,1,2 \
        --next-grid 64:1:0,32:1:0,16:1:0,8:1:0,4:1:0 --l1-grid 32:1:0 "$@"; }
case_fmnist_ring() { fmnist --topology ring --json $R/fmnist_ring.json; }
case_fmnist_er()   { fmnist --topology erdos_renyi --p 0.4 --topo-seed 0 --json $R/fmnist_er.json; }
case_digits_l1() {    # more l1 weights on the ring (appended to digits_ring.json)
    for lam in 0.003 0.01; do
        run --dataset digits --topology ring --steps 400 --only next-l1 --l1-lam $lam --append \
            --json $R/digits_ring.json
    done; }
case_threads() { python benchmarks/bench_next_threads.py --samples 179 --repeats 7 --json $R/threads.json; }
case_digits_gn() {    # Gauss-Newton surrogate (squared loss); expensive: one Jacobian per agent per round
    run --dataset digits --loss squared --topology ring --steps 150 --lbfgs-iters 500 \
        --central-lr 0.5,1,2,4 --cdsgd-lr 0.5,1,2,4 --next-grid 8:1:0,4:1:0,2:1:0,1:1:0 \
        --gn-grid 1:1:0 --gn-inner 20 --json $R/digits_ring_squared.json; }

cases=${*:-"digits_ring digits_er digits_l1 fmnist_ring fmnist_er threads report"}
for c in $cases; do
    if [ "$c" = report ]; then
        files=""
        for n in digits_ring digits_er fmnist_ring fmnist_er digits_ring_dirichlet digits_ring_squared; do
            [ -f "$R/$n.json" ] && files="$files $R/$n.json"
        done
        python benchmarks/bench_next.py report $files --md docs/bench_next.md --img docs/img \
            --threads-json $R/threads.json
    else
        echo "== $c"; "case_$c"
    fi
done
