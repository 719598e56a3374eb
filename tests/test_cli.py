"""The CLI under mpiexec: a user error is one message and exit status 2 on every rank."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_mpi_suite import mpiexec

ROOT = Path(__file__).resolve().parent.parent


def _run(n, *args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*mpiexec(), "-n", str(n), sys.executable, "-m", "mpidl", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


# Each rank writes its own stdout, stderr and exit status to files named by its rank (MPICH's
# PMI_RANK or Open MPI's OMPI_COMM_WORLD_RANK), so every rank's behaviour is seen, not only
# mpiexec's combined exit status and output.
PER_RANK = ('r="${PMI_RANK:-$OMPI_COMM_WORLD_RANK}"; "$0" -m mpidl "$@" >"$D/out.$r" 2>"$D/err.$r"; '
            'echo $? >"$D/rc.$r"')


@pytest.mark.parametrize("args,match", [
    (["run", "--set", "algorithm.lrate=0.1"], "unknown key(s) lrate"),
    (["run", "--set", "topology.name=hypercube", "--set", "data.dataset=digits"], "power-of-two"),
    (["run", "--set", "data.dataset=mnist", "--set", 'data.data_dir="/nonexistent"'], "/nonexistent"),
])
def test_user_error_is_reported_once(args, match, tmp_path):
    n = 3
    env = dict(os.environ, OMP_NUM_THREADS="1", D=str(tmp_path))
    proc = subprocess.run([*mpiexec(), "-n", str(n), "sh", "-c", PER_RANK, sys.executable, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]           # the wrapper, not mpidl
    rcs = {r: (tmp_path / f"rc.{r}").read_text().strip() for r in range(n) if (tmp_path / f"rc.{r}").exists()}
    assert rcs == {r: "2" for r in range(n)}, f"exit status per rank {rcs}"
    err = {r: (tmp_path / f"err.{r}").read_text() for r in range(n)}
    lines = {r: [ln for ln in err[r].splitlines() if ln.strip()] for r in range(n)}
    assert len(lines[0]) == 1 and "error:" in lines[0][0] and match in lines[0][0], err[0][-3000:]
    assert all(lines[r] == [] for r in range(1, n)), {r: err[r][-1000:] for r in range(1, n)}
    assert not any("Traceback" in (tmp_path / f"out.{r}").read_text() for r in range(n))


def test_small_training_run_end_to_end(tmp_path):
    proc = _run(2, "run", "--set", "data.dataset=digits", "--set", "model.hidden=[16]",
                "--set", "run.batch_size=32", "--set", "run.epochs=2", "--set", f'run.out="{tmp_path}"',
                "--set", "run.name=e2e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished (done)" in proc.stdout
    assert (tmp_path / "e2e" / "results.h5").is_file()
    assert any((tmp_path / "e2e" / "checkpoints").glob("step_*"))
