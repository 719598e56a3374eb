#!/usr/bin/env bash
# Cluster checks (docs/clusters.md): Open MPI as well as MPICH, srun and sbatch under a real Slurm.
#   1. installs Debian's Open MPI, Slurm (slurm-wlm) and munge when missing (apt-get);
#   2. builds mpi4py against Open MPI in its own virtual environment ($MPIDL_OMPI_VENV,
#      default ~/.cache/mpidl/venv-ompi; kept between runs, and pip caches the built wheel);
#   3. runs the MPI test suite (and the other mpiexec tests) under Open MPI's mpiexec;
#   4. starts munged + slurmctld + slurmd (scripts/cluster/slurm.sh, everything under a
#      temporary folder, MpiDefault=none like Debian's) and runs tests/cluster/slurm_checks.py
#      with the README's MPICH set-up (.venv);
#   5. starts an emulated 2-node cluster (scripts/cluster/vnodes.sh, links shaped to 100 Mbit/s)
#      and runs tests/cluster/multinode_checks.py on it under MPICH and Open MPI;
#   6. stops what it started (trap), prints the time taken, exits non-zero if any check failed.
# It needs root and apt-get; elsewhere (or when apt-get cannot install the packages) it prints
# "SKIPPED: <why>" and exits 0 without checking anything; MPIDL_REQUIRE_CLUSTER=1 makes a skip
# an error (exit 1).  Extra arguments go to every pytest call (e.g. -x, -k name).
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
say() { echo "[test-cluster] $*"; }

skip() {
    say "SKIPPED: $*; no cluster check ran (docs/clusters.md says how to run them by hand)"
    [ "${MPIDL_REQUIRE_CLUSTER:-0}" = 1 ] && { say "MPIDL_REQUIRE_CLUSTER=1: a skip is a failure"; exit 1; }
    exit 0
}
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    skip "needs root and apt-get (Debian) to install Open MPI, Slurm and munge"
fi
exec 9>/tmp/mpidl-test-cluster.lock
if ! flock -n 9; then
    say "another test-cluster.sh is running on this machine: waiting for it"
    flock 9
fi

set -e
pkgs="openmpi-bin libopenmpi-dev slurm-wlm munge iproute2"
missing=$(for p in $pkgs; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
    say "installing $(echo $missing)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; }; then
        skip "apt-get could not install $(echo $missing) (no Debian mirror reachable?)"
    fi
fi
t_apt=$(date +%s)
say "packages: $((t_apt - t0)) s"

bash scripts/setup.sh   # the README's set-up: .venv with the MPICH wheel
venv=${MPIDL_OMPI_VENV:-$HOME/.cache/mpidl/venv-ompi}
stamp="$venv/.mpidl-ompi-$(cat setup.py /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h 2>/dev/null | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    say "building mpi4py against Open MPI in $venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q torch==2.13.0
    MPICC=mpicc.openmpi "$venv/bin/python" -m pip install -q --no-binary mpi4py "mpi4py>=4"
    "$venv/bin/python" -m pip install -q -e ".[test,plot,data]"
    touch "$stamp"
fi
# The venv is shared by every clone on this machine: its editable mpidl must be this clone's
# (checked from outside the tree, as the ranks of tests/mpi/run.py import it).
where="$(cd / && "$venv/bin/python" -c 'import mpidl, mpidl.kernels; print(mpidl.__file__, mpidl.kernels.__file__)' 2>/dev/null || true)"
if [ "$where" != "$PWD/mpidl/__init__.py $PWD/kernels/__init__.py" ]; then
    say "installing this clone's mpidl into $venv (it had: ${where:-none})"
    "$venv/bin/python" -m pip install -q --no-deps -e .
fi
"$venv/bin/python" - <<'PY'
from mpi4py import MPI
v = MPI.Get_library_version()
assert "Open MPI" in v, f"{__import__('mpi4py').__file__} is not built against Open MPI: {v[:80]}"
print("[test-cluster] Open MPI venv:", v.splitlines()[0][:60], "MPI", MPI.Get_version())
import os, mpidl, mpidl.kernels
here = os.getcwd()
assert mpidl.__file__ == f"{here}/mpidl/__init__.py" and mpidl.kernels.__file__ == f"{here}/kernels/__init__.py", \
    f"the Open MPI venv imports mpidl from {mpidl.__file__} and {mpidl.kernels.__file__}, not from {here}"
PY
t_build=$(date +%s)
say "virtual environments: $((t_build - t_apt)) s"
set +e

failed=()
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Containers often forbid the cross-memory attach (CMA) that Open MPI's shared-memory transport
# uses for large messages; seen here as a segfault of the LSGD window tests. Copy-in/copy-out instead.
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
say "MPI tests under Open MPI (mpiexec.openmpi --oversubscribe)"
MPIDL_MPIEXEC=mpiexec.openmpi MPIDL_MPIEXEC_ARGS="--oversubscribe" \
    "$venv/bin/python" -m pytest -q tests/test_mpi_suite.py tests/test_cli.py tests/test_checkpoint.py \
    tests/test_crash_resume.py "$@" || failed+=("MPI tests under Open MPI")
t_ompi=$(date +%s)
say "MPI tests under Open MPI: $((t_ompi - t_build)) s"

slurm_dir=$(mktemp -d /tmp/mpidl-slurm.XXXXXX)
vn_dir=$(mktemp -d /tmp/mpidl-vnodes.XXXXXX)
cleanup() {
    bash scripts/cluster/slurm.sh stop "$slurm_dir" >/dev/null 2>&1 || true
    rm -rf "$slurm_dir"
    [ -f "$vn_dir/c/vnodes.env" ] && bash scripts/cluster/vnodes.sh stop "$vn_dir/c" >/dev/null 2>&1
    rm -rf "$vn_dir"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM
if bash scripts/cluster/slurm.sh start "$slurm_dir"; then
    export SLURM_CONF=$slurm_dir/slurm.conf
    say "Slurm checks (tests/cluster/slurm_checks.py)"
    export MPIDL_OMPI_PYTHON="$venv/bin/python"
    if ! .venv/bin/python -m pytest -v tests/cluster/slurm_checks.py "$@"; then
        # Session 3 saw MPI_Init of the MPICH wheel fail here (stale MPICH shared-memory segments
        # whose names a fresh Slurm's job ids reused; fixed in scripts/cluster/slurm.sh and
        # tests/shm_orphans.py, docs/clusters.md). Rerun the failed checks once, and say so, as a
        # safety net for other transient causes.
        ok=0
        say "Slurm checks failed; rerunning the failed ones once (see the reason in the log above)"
        if .venv/bin/python -m pytest -v --last-failed tests/cluster/slurm_checks.py "$@"; then
            ok=1; say "the failed Slurm checks passed on the rerun"
        fi
        [ "$ok" = 1 ] || failed+=("Slurm checks")
    fi
else
    failed+=("starting Slurm")
fi
t_slurm=$(date +%s)
bash scripts/cluster/slurm.sh stop "$slurm_dir" >/dev/null 2>&1 || true

# Multi-node: 2 emulated nodes x 2 ranks, links shaped to 100 Mbit/s, under MPICH and Open MPI.
vn_out=$(bash scripts/cluster/vnodes.sh start 2 "$vn_dir/c" --rate 100mbit 2>&1); vn_rc=$?
echo "$vn_out"
if [ $vn_rc = 0 ] && [ -f "$vn_dir/c/vnodes.env" ]; then
    say "multi-node checks (tests/cluster/multinode_checks.py) on 2 emulated nodes"
    # the kill -9 + resume check under MPICH only (CI budget; Open MPI's kill path is checked on one
    # node by test_crash_resume.py above)
    export MPIDL_VNODES="$vn_dir/c" MPIDL_OMPI_PYTHON="$venv/bin/python" MPIDL_MULTINODE_KILL=${MPIDL_MULTINODE_KILL:-mpich}
    if ! .venv/bin/python -m pytest -v tests/cluster/multinode_checks.py "$@"; then
        # as for the Slurm checks: rerun the failed ones once, and say so (session 8 saw the sbatch
        # check fail once at load 15 and pass in 5 reruns; its message now carries the Slurm logs)
        say "multi-node checks failed; rerunning the failed ones once (see the reason in the log above)"
        .venv/bin/python -m pytest -v --last-failed tests/cluster/multinode_checks.py "$@" \
            && say "the failed multi-node checks passed on the rerun" || failed+=("multi-node checks")
    fi
    bash scripts/cluster/vnodes.sh stop "$vn_dir/c" || failed+=("stopping the emulated cluster")
elif [ $vn_rc = 0 ]; then
    say "multi-node checks SKIPPED (vnodes.sh: ${vn_out##*SKIPPED: })"
    [ "${MPIDL_REQUIRE_CLUSTER:-0}" = 1 ] && failed+=("multi-node checks (skipped)")
else
    failed+=("starting the emulated cluster")
fi
t_end=$(date +%s)
say "times: packages $((t_apt - t0)) s, venvs $((t_build - t_apt)) s, Open MPI tests $((t_ompi - t_build)) s," \
    "Slurm $((t_slurm - t_ompi)) s, multi-node $((t_end - t_slurm)) s; total $((t_end - t0)) s"
if [ ${#failed[@]} -gt 0 ]; then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "all cluster checks passed"
