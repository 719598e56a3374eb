"""Import isolation: mpidl.kernels / topology / config never import torch or mpi4py
(not merely "work without them"), and importing any mpidl module makes no MPI call."""
import subprocess
import sys

import pytest

# Every import of torch or mpi4py is recorded (then refused), so a guarded
# `try: import torch except ImportError: ...` inside these modules is caught too.
NEVER = r"""
import sys
attempts = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mpi4py', 'torch'):
            attempts.append(name)
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Watch())
import mpidl, mpidl.kernels, mpidl.topology, mpidl.config, mpidl.errors
mpidl.topology.ring(4).spectral_gap()
import numpy as np
mpidl.kernels.combine(np.ones(3), np.ones((1, 3)), 0.5, [0.5])
assert not attempts, f'tried to import {attempts}'
assert not any(m.split('.')[0] in ('mpi4py', 'torch') for m in sys.modules)
print('ok')
"""

# mpi4py is installed and its MPI module loaded without initialising MPI; then every mpidl module
# is imported.  A module-level MPI call would either initialise MPI or fail (MPI not initialised).
NO_MPI_CALL = r"""
import importlib, pkgutil, sys
PRELOAD = %r
if PRELOAD:
    import mpi4py
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI
import mpidl
names = sorted(m.name for m in pkgutil.walk_packages(mpidl.__path__, 'mpidl.') if m.name != 'mpidl.__main__')
for name in names:
    importlib.import_module(name)
assert 'mpidl.comm' in names and 'mpidl.driver' in names and len(names) > 20, names
if PRELOAD:
    assert not MPI.Is_initialized(), 'importing mpidl initialised MPI'
else:
    assert 'mpi4py.MPI' not in sys.modules, 'importing mpidl loaded mpi4py.MPI'
print('ok')
"""


def _run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_kernels_topology_config_never_import_mpi_or_torch():
    _run(NEVER)


@pytest.mark.parametrize("preload", [False, True])
def test_importing_mpidl_makes_no_mpi_call(preload):
    pytest.importorskip("mpi4py")
    _run(NO_MPI_CALL % preload)


# -- issue 24 item 4: light imports --------------------------------------------------------------
# Each snippet runs in a fresh interpreter and must leave torch out of sys.modules.
NO_TORCH = {
    "import": "import mpidl",
    "topo": "import sys; sys.argv = ['mpidl', 'topo', 'ring', '4']; import runpy; "
            "runpy.run_module('mpidl', run_name='__main__', alter_sys=True)",
    "convex-next-config": "from mpidl import config as C; "
                          "cfg = C.load(None, ['algorithm.name=next', 'model.name=\"convex-logistic\"', "
                          "'data.dataset=synthetic-logistic']); assert cfg.algorithm.name == 'next'",
    "registry-listing": "from mpidl import config as C; assert 'fdg' in C.algorithm_registry(); "
                        "assert C.algorithm_layout('next') is None",
    "plots": "import mpidl.plots, sys; assert 'mpidl.metrics' not in sys.modules",
}
CHECK = "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n"


@pytest.mark.parametrize("name", sorted(NO_TORCH))
def test_light_paths_never_import_torch(name):
    code = NO_TORCH[name]
    if name == "topo":     # the command exits through SystemExit; check torch in an atexit hook
        code = ("import atexit, sys\natexit.register(lambda: print('torch' not in sys.modules and 'ok'))\n"
                + code)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd="/")
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout[-2000:], out.stderr[-3000:])
        assert "spectral gap" in out.stdout
        return
    _run(code + CHECK)


def test_convex_next_run_never_imports_torch(tmp_path):
    """A whole convex NEXT run (1 rank, CLI entry point) imports no torch, and trains."""
    pytest.importorskip("mpi4py")
    code = ("import sys\nfrom mpidl.__main__ import main\n"
            f"rc = main(['run', '--set', 'algorithm.name=next', '--set', 'model.name=\"convex-logistic\"', "
            f"'--set', 'data.dataset=synthetic-logistic', '--set', 'run.steps=3', '--set', 'run.batch_size=0', "
            f"'--set', 'run.out=\"{tmp_path}\"', '--set', 'run.name=cvx'])\n"
            "assert rc == 0, rc\n" + CHECK)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "ok", out.stderr[-3000:]
    assert "finished (done) at step 3/3" in out.stdout
    assert (tmp_path / "cvx" / "results.h5").is_file()
