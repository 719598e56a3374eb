#!/usr/bin/env bash
# Run a config on this machine with mpiexec (same command as the sbatch scripts use with srun).
#   jobs/local.sh jobs/configs/cdsgd_fmnist.toml [RANKS] [--set section.key=value ...]
set -euo pipefail
cfg=${1:?usage: jobs/local.sh CONFIG.toml [RANKS] [--set k=v ...]}
shift
ranks=4
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then ranks=$1; shift; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec mpiexec -n "$ranks" python -m mpidl run "$cfg" "$@"
