#!/usr/bin/env bash
# Validation runs of the scaling model (docs/scaling.md, issue 29 part 4): for each node count N,
# an emulated cluster of N nodes (scripts/cluster/vnodes.sh, 1 rank per node), and for each
# family, close in time: "compute", N single-rank runs (each under mpiexec -n 1: a singleton
# MPICH process runs about 1.7x slower here) of the same config at once (no
# communication, the same N processes competing for the machine's cores as the N ranks do), and
# "shaped", the N-rank run over links shaped to RATE. fdg cannot run on one rank (stages >= 2):
# its "compute" is the N-rank run with the links unshaped, and so is that of the families listed
# in UNSHAPED_COMPUTE="lsgd cdmsgd" (a cross-check). Alternates the two, REPS times.
#   sudo bash benchmarks/run_scaling.sh OUTDIR RATE "2 4 8" REPS [families...]
# Writes OUTDIR/runs.tsv (N family cond rep load1 results) for benchmarks/scaling_report.py.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?OUTDIR}; rate=${2:?RATE}; ns=${3:?"node counts"}; reps=${4:-2}; shift 4 || true
fams=${*:-"cdmsgd centralized fedavg lsgd easgd fdg"}
py=$here/.venv/bin/python
mkdir -p "$out"
export OMP_NUM_THREADS=1
# the study's model and hyper-parameters (jobs/studies/fmnist_all.toml); next keeps its config
common=(--set model.name='"mlp"' --set 'model.hidden=[256, 256, 128]' --set run.steps=208
        --set run.log_every=16 --set run.eval_every=1000 --set run.checkpoint_every=1000
        --set run.batch_size=128)
cfg_of() { case $1 in
    lsgd) echo "jobs/configs/lsgd_fmnist.toml" ;;
    easgd) echo "jobs/configs/easgd_fmnist.toml" ;;
    *) echo "jobs/configs/$1_fmnist.toml" ;; esac; }
extra_of() { case $1 in
    cdmsgd|centralized) echo "--set algorithm.lr=0.01" ;;
    next) echo "--set run.batch_size=256" ;;   # next keeps its own batch
    *) echo "" ;; esac; }
# vnodes.sh gives its token buckets a burst of 10 ms of traffic (1.25 MB at 1 Gbit/s): a link idle
# during the compute then passes a whole 1.2 MB model at veth speed, which no real link does.
# The validation reshapes every link with a burst of BURST bytes (default 256 KiB, 2 ms at
# 1 Gbit/s) so the link's rate holds at the scale of one message. Smaller is worse, not better:
# with 64 KiB a 1.2 MB Sendrecv between two nodes took 28 ms instead of 10 (the shaper's timers
# on the loaded machine); with 256 KiB 8.6-9.0 ms, with the default 10 ms burst 4.2-7.5 ms.
burst=${BURST:-262144}
small_burst() {
    # shellcheck disable=SC1091
    . "$1/vnodes.env"
    local i
    for i in $(seq 0 $((VN_K - 1))); do
        ip netns exec "mpidl-vn$VN_ID-$i" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency 100ms
        ip netns exec "mpidl-vn$VN_ID-sw" tc qdisc replace dev "p$i" root tbf rate "$rate" burst "$burst" latency 100ms
    done
}
for n in $ns; do
    dir=/tmp/scaling-vn$n
    bash "$here/scripts/cluster/vnodes.sh" stop "$dir" >/dev/null 2>&1 || true
    bash "$here/scripts/cluster/vnodes.sh" start "$n" "$dir" --rate "$rate" >/dev/null
    for rep in $(seq 1 "$reps"); do
        for fam in $fams; do
            for cond in compute shaped; do
                name="n${n}_${fam}_${cond}_${rep}"
                load=$(cut -d' ' -f1 /proc/loadavg)
                if [ $cond = compute ] && [ "$fam" != fdg ] && [[ " ${UNSHAPED_COMPUTE:-} " != *" $fam "* ]]; then
                    pids=()
                    for i in $(seq 1 "$n"); do
                        # shellcheck disable=SC2046
                        (cd "$here" && timeout 300 "$here/.venv/bin/mpiexec" -n 1 "$py" -m mpidl run "$(cfg_of "$fam")" "${common[@]}" $(extra_of "$fam") \
                            --set run.out="\"$out/runs\"" --set run.name="\"${name}_$i\"" --set run.resume='"no"' \
                            >"$out/${name}_$i.log" 2>&1) & pids+=($!)
                    done
                    ok=1
                    for p in "${pids[@]}"; do wait "$p" || ok=0; done
                    load2=$(cut -d' ' -f1 /proc/loadavg)
                    if [ $ok = 1 ]; then
                        for i in $(seq 1 "$n"); do
                            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$fam" "$cond" "$rep" "$load $load2" \
                                "$out/runs/${name}_$i/results.h5" >>"$out/runs.tsv"
                        done
                    else
                        echo "FAILED $name" | tee -a "$out/failed.txt"
                    fi
                    continue
                fi
                if [ $cond = compute ]; then bash "$here/scripts/cluster/vnodes.sh" rate "$dir" unshaped >/dev/null
                else bash "$here/scripts/cluster/vnodes.sh" rate "$dir" "$rate" >/dev/null; small_burst "$dir"; fi
                # shellcheck disable=SC2046
                if (cd "$here" && timeout 300 "$dir/mpiexec" -n "$n" "$py" -m mpidl run "$(cfg_of "$fam")" \
                        "${common[@]}" $(extra_of "$fam") --set run.out="\"$out/runs\"" \
                        --set run.name="\"$name\"" --set run.resume='"no"' >"$out/$name.log" 2>&1); then
                    load2=$(cut -d' ' -f1 /proc/loadavg)
                    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$fam" "$cond" "$rep" "$load $load2" \
                        "$out/runs/$name/results.h5" >>"$out/runs.tsv"
                else
                    echo "FAILED $name (see $out/$name.log)" | tee -a "$out/failed.txt"
                fi
            done
        done
    done
    bash "$here/scripts/cluster/vnodes.sh" stop "$dir" >/dev/null
done
