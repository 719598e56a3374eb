"""Launch every MPI test file under mpiexec at several world sizes.

Each ``tests/mpi/mpitest_*.py`` may declare ``MPI_SIZES = (...)`` (default
1, 2, 3, 4) and ``MPI_TIMEOUT = seconds`` (default 300).  A launch that
exceeds its timeout is killed and fails, so a hang shows as a failure.

The launcher is the mpiexec next to ``sys.executable`` (or on PATH); override
it with ``MPIDL_MPIEXEC`` and add launcher options with ``MPIDL_MPIEXEC_ARGS``,
e.g. for Open MPI as root::

    MPIDL_MPIEXEC=mpiexec.openmpi MPIDL_MPIEXEC_ARGS=--oversubscribe \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 python -m pytest tests/test_mpi_suite.py
"""
import ast
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

MPI_DIR = Path(__file__).resolve().parent / "mpi"
ROOT = MPI_DIR.parent.parent


def _declared(path, name, default):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    return default


def _cases():
    for f in sorted(MPI_DIR.glob("mpitest_*.py")):
        for n in _declared(f, "MPI_SIZES", (1, 2, 3, 4)):
            yield pytest.param(f, n, _declared(f, "MPI_TIMEOUT", 300), id=f"{f.stem}-np{n}")


def mpiexec():
    """The launcher as a list: ``$MPIDL_MPIEXEC`` if set, else the mpiexec next to this Python
    (the MPICH wheel puts one there), else ``mpiexec`` on PATH; then ``$MPIDL_MPIEXEC_ARGS``
    (e.g. ``--oversubscribe`` for Open MPI).  Both are split like a shell would."""
    override = os.environ.get("MPIDL_MPIEXEC", "").strip()
    if override:
        cmd = shlex.split(override)
        if not shutil.which(cmd[0]):
            pytest.fail(f"MPIDL_MPIEXEC={override!r}: {cmd[0]} not found")
    else:
        cand = Path(sys.executable).parent / "mpiexec"
        found = str(cand) if cand.exists() else shutil.which("mpiexec")
        if not found:
            pytest.fail("mpiexec not found: install an MPI (pip install mpich), put mpiexec on PATH "
                        "or set MPIDL_MPIEXEC")
        cmd = [found]
    return cmd + shlex.split(os.environ.get("MPIDL_MPIEXEC_ARGS", ""))


@pytest.mark.parametrize("path,n,timeout", list(_cases()))
def test_mpi(path, n, timeout, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIDL_TEST_LOGDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [*mpiexec(), "-n", str(n), sys.executable, str(MPI_DIR / "run.py"), str(path),
           "--rootdir", str(ROOT), "-c", str(ROOT / "pytest.ini")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
        stdout, stderr = proc.communicate()
        pytest.fail(f"{path.name} at {n} ranks hung past {timeout}s (killed)\n{stdout[-4000:]}\n{stderr[-2000:]}")
    if proc.returncode != 0:
        logs = "".join(f"\n--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("rank*.log")))
        pytest.fail(f"{path.name} at {n} ranks exited {proc.returncode}\n"
                    f"{stdout[-6000:]}\n{stderr[-4000:]}{logs}")
