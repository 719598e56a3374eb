#!/usr/bin/env bash
# Validation runs of the scaling model (docs/scaling.md, issue 29 part 4): for each node count N,
# an emulated cluster of N nodes (scripts/cluster/vnodes.sh, 1 rank per node), and for each
# family two short runs close in time: links unshaped ("compute": the step with communication at
# veth speed) and links shaped to RATE ("full" step). Alternates the two, REPS times.
#   sudo bash benchmarks/run_scaling.sh OUTDIR RATE "2 4 8" REPS [families...]
# Writes OUTDIR/runs.tsv (N family cond rep load1 results) for benchmarks/scaling_report.py.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?OUTDIR}; rate=${2:?RATE}; ns=${3:?"node counts"}; reps=${4:-2}; shift 4 || true
fams=${*:-"cdmsgd centralized fedavg lsgd easgd fdg next"}
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
for n in $ns; do
    dir=/tmp/scaling-vn$n
    bash "$here/scripts/cluster/vnodes.sh" stop "$dir" >/dev/null 2>&1 || true
    bash "$here/scripts/cluster/vnodes.sh" start "$n" "$dir" --rate "$rate" >/dev/null
    for rep in $(seq 1 "$reps"); do
        for fam in $fams; do
            for cond in unshaped shaped; do
                if [ $cond = unshaped ]; then bash "$here/scripts/cluster/vnodes.sh" rate "$dir" unshaped >/dev/null
                else bash "$here/scripts/cluster/vnodes.sh" rate "$dir" "$rate" >/dev/null; fi
                name="n${n}_${fam}_${cond}_${rep}"
                load=$(cut -d' ' -f1 /proc/loadavg)
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
