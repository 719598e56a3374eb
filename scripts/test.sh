#!/usr/bin/env bash
# The test suite: set-up (idempotent), then serial tests and the MPI tests
# (tests/mpi/mpitest_*.py, launched under mpiexec at 1..4 ranks by tests/test_mpi_suite.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${MPIDL_NO_VENV:-0}" != 1 ]; then . .venv/bin/activate; fi
export OMP_NUM_THREADS=1
exec python -m pytest "$@"
