"""The examples/ scripts run under mpiexec at 2 ranks with --small sizes and reach their accuracy."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_mpi_suite import mpiexec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["fit_numpy.py", "fit_own_module.py", "own_loop_consensus.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_and_learns(script, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [*mpiexec(), "-n", "2", sys.executable, str(ROOT / "examples" / script), "--small"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script} hung\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    accs = [float(a) for a in re.findall(r"test accuracy[^0-9]*([01]\.\d+)", out)]
    assert accs and min(accs) > 0.8, f"{script}: accuracy {accs}\n{out}"
    if script.startswith("fit_"):
        assert list(tmp_path.glob("runs/*/results.h5")), "no results file under runs/"
