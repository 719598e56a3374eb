#!/bin/bash
# Issue 8 accuracy runs (benchmarks/bench_decoupled.py train); results in benchmarks/results/decoupled/.
# Accuracy only: oversubscription is fine; each run takes the shared lock on its own, so an
# exclusive timing run can get in between.
#   bash benchmarks/run_decoupled.sh [cnn|mlp|all]
set -euo pipefail
cd "$(dirname "$0")/.."
# a lock shared by everyone timing on this machine (timings take it exclusively): BENCH_LOCK
LOCK=${BENCH_LOCK:-/work/bench.lock}; [ -d "$(dirname "$LOCK")" ] || LOCK=/tmp/mpidl-bench.lock
export OMP_NUM_THREADS=1
B="python benchmarks/bench_decoupled.py train"
L="flock -s $LOCK mpiexec"
HP=(--set algorithm.momentum=0.9 --set algorithm.weight_decay=0.0005)
what=${1:-all}
if [[ $what == cnn || $what == all ]]; then
  # CNN, K = 2 vs backprop: the first 10000 samples of Fashion-MNIST's training set, batch 64, 10 epochs
  CNN=(--subset 10000 --eval-every 2 --set model.name=cnn --set run.batch_size=64 --set run.epochs=10
       --set algorithm.lr=0.01 "${HP[@]}")
  $L -n 1 $B cnn_BP "${CNN[@]}" --set algorithm.stages=1 &
  $L -n 2 $B cnn_K2 "${CNN[@]}" --set algorithm.stages=2 --set "algorithm.cuts=[2]" &
  wait
fi
if [[ $what == mlp || $what == all ]]; then
  # MLP 784-256-256-128-10 (4 units), full training set, batch 128, 10 epochs: K = 1..4, beta, M x K = 2 x 2.
  # (lr05_BP / lr05_K2 in the results are the first two runs with lr 0.05: too large for the stale
  # stages; K = 4 at lr 0.05 sat at 10% accuracy for its first 3 epochs and was stopped.)
  MLP=(--set model.name=mlp --set "model.hidden=[256, 256, 128]" --set run.batch_size=128 --set run.epochs=10
       --set algorithm.lr=0.01 "${HP[@]}")
  $L -n 1 $B mlp_BP "${MLP[@]}" --set algorithm.stages=1
  $L -n 2 $B mlp_K2 "${MLP[@]}" --set algorithm.stages=2 --set "algorithm.cuts=[2]"
  $L -n 4 $B mlp_K4 "${MLP[@]}" --set algorithm.stages=4 --set "algorithm.cuts=[1, 2, 3]"
  $L -n 3 $B mlp_K3 "${MLP[@]}" --set algorithm.stages=3 --set "algorithm.cuts=[1, 2]"
  for beta in 0.5 0.25; do
    $L -n 4 $B mlpbeta_K4-beta$beta "${MLP[@]}" --set algorithm.stages=4 --set "algorithm.cuts=[1, 2, 3]" \
      --set algorithm.beta=$beta
  done
  $L -n 2 $B mlpbeta_K2-beta0.5 "${MLP[@]}" --set algorithm.stages=2 --set "algorithm.cuts=[2]" \
    --set algorithm.beta=0.5
  $L -n 4 $B mlpdp_M2K2 "${MLP[@]}" --set algorithm.stages=2 --set algorithm.replicas=2 --set "algorithm.cuts=[2]"
fi
