"""mpidl: parallel and decentralized training of neural networks over MPI.

MPI ranks are agents; neighbour collectives on a distributed-graph
communicator implement graph consensus (:class:`mpidl.comm.GraphComm`);
Numba kernels (:mod:`mpidl.kernels`) do the per-agent math; torch holds the
models; HDF5 holds shards, checkpoints and results.

Importing mpidl performs no MPI call and probes nothing: MPI initialises on
the first use of :func:`mpidl.comm.world` or a :class:`GraphComm`.
"""
__version__ = "0.1.0"

from mpidl.errors import MpidlError  # noqa: E402
from mpidl.topology import Topology, TopologyError  # noqa: E402
from mpidl import topology  # noqa: E402

__all__ = ["__version__", "MpidlError", "Topology", "TopologyError", "topology", "GraphComm",
           "Config", "train", "fit", "FitResult", "optim", "broadcast_parameters", "average_parameters"]

# lazy: keep mpi4py and torch out of ``import mpidl`` (name -> module that defines it)
_LAZY = {"GraphComm": "mpidl.comm", "Config": "mpidl.config", "train": "mpidl.api", "fit": "mpidl.api",
         "FitResult": "mpidl.api", "broadcast_parameters": "mpidl.optim", "average_parameters": "mpidl.optim"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "optim":
        import importlib
        return importlib.import_module("mpidl.optim")
    raise AttributeError(f"module 'mpidl' has no attribute {name!r}")
