"""mpidl.kernels and mpidl.topology import with mpi4py and torch blocked."""
import subprocess
import sys

CODE = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mpi4py', 'torch'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import mpidl, mpidl.kernels, mpidl.topology
mpidl.topology.ring(4).spectral_gap()
import numpy as np
mpidl.kernels.combine(np.ones(3), np.ones((1, 3)), 0.5, [0.5])
assert not any(m.split('.')[0] in ('mpi4py', 'torch') for m in sys.modules)
print('ok')
"""


def test_kernels_and_topology_import_without_mpi_and_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
