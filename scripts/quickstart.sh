#!/usr/bin/env bash
# Set up (idempotent) and run the main job on one machine with mpiexec.
# Extra arguments go to the job, e.g.  bash scripts/quickstart.sh --ranks 8
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${MPIDL_NO_VENV:-0}" != 1 ]; then . .venv/bin/activate; fi
export OMP_NUM_THREADS=1
ranks=4
if [ "${1:-}" = "--ranks" ]; then ranks=$2; shift 2; fi
exec mpiexec -n "$ranks" python -m mpidl run jobs/configs/quickstart.toml "$@"
