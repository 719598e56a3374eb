#!/usr/bin/env bash
# Mutation testing (cosmic-ray) of the modules whose tests are fast and deterministic.
# Not part of CI: run it when one of these modules changes, and update docs/testing.md.
#
#   bash scripts/mutation.sh                 # every target below (about an hour on 2 cores)
#   bash scripts/mutation.sh kernels-mixing algorithms-base   # some targets
#   bash scripts/mutation.sh --list          # the targets and their test commands
#
# Needs the "mutation" extra (pip install -e .[mutation]).  The work happens in a copy of the
# tree ($MUTATION_DIR/src-<target>, default MUTATION_DIR=/tmp/mpidl-mutation): cosmic-ray rewrites
# the module on disk for every mutant, so the working tree is never touched.  Per target it writes
# $MUTATION_DIR/<target>.sqlite (the session; rerunning resumes it) and
# $MUTATION_DIR/<target>.txt (the report with the diff of every surviving mutant).
# MUTATION_RECHECK=1 reruns only the survivors of an existing session against the current tests
# (after adding a test that should kill them).
# MUTATION_LINES="120-260,300-340" (when the session is created) overrides a target's line ranges.
# On a shared machine run it under `flock -s /work/bench.lock bash scripts/mutation.sh ...`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${MPIDL_NO_VENV:-0}" != 1 ] && [ -f "$ROOT/.venv/bin/activate" ]; then . "$ROOT/.venv/bin/activate"; fi
export OMP_NUM_THREADS=1
OUT="${MUTATION_DIR:-/tmp/mpidl-mutation}"
NP="${MUTATION_NP:-3}"      # world size of the MPI tests that kill the algorithms' mutants
MPI_RUN="mpiexec -n $NP python tests/mpi/run.py"
# A mutant that hangs a collective (a message never sent) fails after this many seconds per MPI
# test (tests/mpi/conftest.py ends the rank, mpiexec the job), well before cosmic-ray's per-mutant
# timeout (MUTATION_TIMEOUT, default 300 s), which kills only the launcher.
export MPIDL_TEST_TIMEOUT="${MPIDL_TEST_TIMEOUT:-90}"

# target | module | lines | test command (run in $SRC; must exit 0 on the unmutated code)
# "lines" (empty: the whole module) keeps only the mutants whose first line lies in those ranges:
# a slow module is split into parts, each with the cheapest tests that check its values.
# pdadmm-layout-session runs at 2 ranks whatever MUTATION_NP says: its one-eval-sample case is a
# 2-layer MLP (skipped at 3 ranks).
# Kernels run with NUMBA_DISABLE_JIT=1: the same code as plain Python, no recompile per mutant.
TARGETS="
kernels-mixing|kernels/mixing.py||env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_mixing.py
kernels-prox|kernels/prox.py||env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_prox.py
kernels-losses|kernels/losses.py||env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_losses.py tests/test_oracles.py
kernels-losses-rest|kernels/losses.py|35-35,42-42,45-45,53-53,57-57,63-63,71-71,73-73,104-106,143-143|env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_losses.py tests/test_oracles.py
kernels-surrogate|kernels/surrogate.py||env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_surrogate.py
kernels-quantize|kernels/quantize.py||env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_quantize.py
kernels-admm|kernels/admm.py|64-163|env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_admm.py
kernels-admm-rest|kernels/admm.py|1-63,164-523|env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_admm.py
kernels-validate|kernels/_validate.py||env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_mixing.py tests/test_kernels_prox.py tests/test_kernels_losses.py tests/test_kernels_surrogate.py tests/test_kernels_quantize.py tests/test_kernels_admm.py
kernels-blas|kernels/_blas.py||env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_mixing.py tests/test_kernels_prox.py tests/test_kernels_losses.py tests/test_kernels_surrogate.py tests/test_kernels_quantize.py tests/test_kernels_admm.py
kernels-threads|kernels/threads.py||env NUMBA_DISABLE_JIT=1 python -m pytest -x -q -p no:cacheprovider tests/test_kernels_mixing.py tests/test_kernels_prox.py tests/test_kernels_losses.py tests/test_kernels_surrogate.py tests/test_kernels_quantize.py tests/test_kernels_admm.py
algorithms-base|mpidl/algorithms/base.py||python -m pytest -x -q -p no:cacheprovider tests/test_lr_schedule.py
algorithms-cdsgd|mpidl/algorithms/cdsgd.py||$MPI_RUN tests/mpi/mpitest_cdsgd.py -x
algorithms-next|mpidl/algorithms/next.py|75-178|$MPI_RUN tests/mpi/mpitest_next.py -x
algorithms-next-config|mpidl/algorithms/next.py|38-68|python -m pytest -x -q -p no:cacheprovider tests/test_next_config.py
algorithms-lsgd|mpidl/algorithms/lsgd.py|160-200,232-259,268-306,341-358,363-374|$MPI_RUN tests/mpi/mpitest_lsgd.py -x
algorithms-lsgd-async|mpidl/algorithms/lsgd.py|131-159,200-231,259-267,306-340,359-362,375-399|$MPI_RUN tests/mpi/mpitest_lsgd_async.py tests/mpi/mpitest_lsgd.py -x
algorithms-fdg|mpidl/algorithms/fdg.py|65-69,262-276|$MPI_RUN tests/mpi/mpitest_fdg.py -x -k 'matches_stacked_reference or k1_equals_centralized or staleness'
algorithms-fdg-step|mpidl/algorithms/fdg.py|175-179,210-260|$MPI_RUN tests/mpi/mpitest_fdg.py -x -k 'matches_stacked_reference or k1_equals_centralized or staleness or driver_resume_is_bitwise'
algorithms-fdg-data|mpidl/algorithms/fdg.py|94-174,180-209,277-296|python -m pytest -x -q -p no:cacheprovider tests/test_fdg_units.py
algorithms-fdg-pipeline|mpidl/algorithms/fdg.py|210-260|python -m pytest -x -q -p no:cacheprovider tests/test_fdg_units.py -k 'grid_evaluation or grid_pipeline'
algorithms-fdg-grid|mpidl/algorithms/fdg_grid.py|1-124|python -m pytest -x -q -p no:cacheprovider tests/test_fdg_units.py -k 'grid and not grid_pipeline'
algorithms-fdg-setup|mpidl/algorithms/fdg_grid.py|125-218|python -m pytest -x -q -p no:cacheprovider tests/test_fdg_units.py -k 'grid and not grid_pipeline or resumed_cuts'
algorithms-lsgd-config|mpidl/algorithms/lsgd.py|67-130|python -m pytest -x -q -p no:cacheprovider tests/test_algorithm_configs.py
algorithms-pdadmm-config|mpidl/algorithms/pdadmm.py|72-127|python -m pytest -x -q -p no:cacheprovider tests/test_algorithm_configs.py
algorithms-fdg-config|mpidl/algorithms/fdg.py|70-93|python -m pytest -x -q -p no:cacheprovider tests/test_algorithm_configs.py
algorithms-pdadmm|mpidl/algorithms/pdadmm.py|420-452|$MPI_RUN tests/mpi/mpitest_pdadmm.py -x -k layer_parallel_equals
algorithms-pdadmm-init|mpidl/algorithms/pdadmm.py|128-290,462-527|python scripts/pytest_one_family.py -x -q -p no:cacheprovider tests/test_pdadmm_units.py
pdadmm-layout-units|mpidl/algorithms/pdadmm_layout.py|36-112,229-241|python scripts/pytest_one_family.py -x -q -p no:cacheprovider tests/test_pdadmm_layout_units.py
pdadmm-layout-session|mpidl/algorithms/pdadmm_layout.py|1-35,113-228,242-254|mpiexec -n 2 python tests/mpi/run.py tests/mpi/mpitest_pdadmm_driver.py -x -k session
algorithms-pdadmm-step|mpidl/algorithms/pdadmm.py|291-419,453-461|$MPI_RUN tests/mpi/mpitest_pdadmm.py -x
topology|mpidl/topology.py||python -m pytest -x -q -p no:cacheprovider tests/test_topology.py
topology-weights|mpidl/topology.py|188-263,353-386|python -m pytest -x -q -p no:cacheprovider tests/test_topology.py
topology-generators|mpidl/topology.py|265-351,388-402|python -m pytest -x -q -p no:cacheprovider tests/test_topology.py
config|mpidl/config.py||python -m pytest -x -q -p no:cacheprovider tests/test_config.py tests/test_lr_schedule.py
config-logic|mpidl/config.py|94-285|python -m pytest -x -q -p no:cacheprovider tests/test_config.py tests/test_lr_schedule.py
config-defaults|mpidl/config.py|1-93|python -m pytest -x -q -p no:cacheprovider tests/test_config.py tests/test_lr_schedule.py
checkpoint|mpidl/checkpoint.py||python -m pytest -x -q -p no:cacheprovider tests/test_checkpoint.py
checkpoint-serial|mpidl/checkpoint.py||python -m pytest -x -q -p no:cacheprovider tests/test_checkpoint_units.py tests/test_checkpoint.py -k 'round_trip or keep_newest or mismatch or corruption or bad_state or crash_mid_save or ckpt_command or preemption_guard_local'
"

# Operators: arithmetic and comparison swaps that change a value (not bit operators, `is`, or
# all 11 x 11 operator pairs), constants, booleans, negations, loops, break/continue.
# Removing a decorator only drops @njit (the same function in Python): excluded.
EXCLUDE='"core/ReplaceBinaryOperator_(?!(Add_Sub|Add_Mul|Sub_Add|Mul_Div|Mul_Add|Div_Mul|Pow_Mul|FloorDiv_Div|Mod_FloorDiv)$)",
 "core/ReplaceComparisonOperator_(?!(Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Eq_NotEq|NotEq_Eq|Lt_Gt|Gt_Lt)$)",
 "core/ReplaceUnaryOperator_.*(Invert|Delete)", "core/RemoveDecorator", "core/ExceptionReplacer"'

if [ "${1:-}" = "--list" ]; then echo "$TARGETS" | sed '/^$/d' | awk -F'|' '{printf "%-20s %-34s %-12s %s\n", $1, $2, $3, $4}'; exit 0; fi
want=("$@")

mkdir -p "$OUT"
[ -f "$ROOT/setup.py" ] && [ -d "$ROOT/mpidl" ] || { echo "not an mpidl tree: $ROOT"; exit 1; }

fresh_copy() {  # $1: folder; a copy of the files git tracks plus untracked ones it does not ignore
    rm -rf "$1"
    mkdir -p "$1"
    (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | (cd "$1" && tar -xf -)
    # the editable install maps mpidl.kernels to <root>/kernels; in the copy a link does it, and
    # PYTHONPATH puts the copy first
    ln -s ../kernels "$1/mpidl/kernels"
    (cd "$1" && PYTHONPATH="$1" python -c "import mpidl, mpidl.kernels; \
assert mpidl.__file__.startswith('$1') and mpidl.kernels.__file__.startswith('$1')")
}

echo "$TARGETS" | sed '/^$/d' | while IFS='|' read -r name module lines cmd; do
    lines="${MUTATION_LINES:-$lines}"
    if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
    cfg="$OUT/$name.toml"
    cat > "$cfg" <<EOF
[cosmic-ray]
module-path = "$module"
timeout = ${MUTATION_TIMEOUT:-300.0}
excluded-modules = []
test-command = "$cmd"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = [$EXCLUDE]
EOF
    SRC="$OUT/src-$name"
    fresh_copy "$SRC"
    echo "== $name: $module${lines:+ (lines $lines)}"
    echo "   tests: $cmd"
    (cd "$SRC" && PYTHONPATH="$SRC" bash -c "$cmd" > "$OUT/$name.baseline.log" 2>&1) || {
        echo "   the tests fail on the unmutated code: see $OUT/$name.baseline.log"; exit 1; }
    session="$OUT/$name.sqlite"
    if [ ! -f "$session" ]; then
        (cd "$SRC" && cosmic-ray init "$cfg" "$session" && cr-filter-operators "$session" "$cfg")
        if [ -n "$lines" ]; then
            python - "$session" "$lines" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
spans = [tuple(int(v) for v in r.split("-")) for r in sys.argv[2].split(",")]
out = [j for j, row in db.execute(
    "SELECT job_id, start_pos_row FROM mutation_specs WHERE job_id NOT IN (SELECT job_id FROM work_results)")
    if not any(a <= row <= b for a, b in spans)]
db.executemany("INSERT INTO work_results (worker_outcome, output, test_outcome, diff, job_id) "
               "VALUES ('SKIPPED', 'outside MUTATION_LINES', NULL, NULL, ?)", [(j,) for j in out])
db.commit()
print(f"   lines {sys.argv[2]}: {len(out)} mutants outside them skipped")
PY
        fi
    fi
    if [ "${MUTATION_RECHECK:-0}" = 1 ]; then
        python - "$session" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
n = db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'").rowcount
db.commit()
print(f"   rechecking {n} survivors")
PY
    fi
    t0=$(date +%s)
    (cd "$SRC" && PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" cosmic-ray exec "$cfg" "$session")
    echo "   $(( $(date +%s) - t0 )) s"
    cr-report --show-diff --surviving-only "$session" > "$OUT/$name.txt"
    rm -rf "$SRC"
    tail -n 4 "$OUT/$name.txt" | sed 's/^/   /'
done
