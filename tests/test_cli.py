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


@pytest.mark.parametrize("args,match", [
    (["run", "--set", "algorithm.lrate=0.1"], "unknown key(s) lrate"),
    (["run", "--set", "topology.name=hypercube", "--set", "data.dataset=digits"], "power-of-two"),
    (["run", "--set", "data.dataset=mnist", "--set", 'data.data_dir="/nonexistent"'], "/nonexistent"),
])
def test_user_error_is_reported_once(args, match):
    proc = _run(3, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_small_training_run_end_to_end(tmp_path):
    proc = _run(2, "run", "--set", "data.dataset=digits", "--set", "model.hidden=[16]",
                "--set", "run.batch_size=32", "--set", "run.epochs=2", "--set", f'run.out="{tmp_path}"',
                "--set", "run.name=e2e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished (done)" in proc.stdout
    assert (tmp_path / "e2e" / "results.h5").is_file()
    assert any((tmp_path / "e2e" / "checkpoints").glob("step_*"))
