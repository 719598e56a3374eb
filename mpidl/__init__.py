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

__all__ = ["__version__", "MpidlError", "Topology", "TopologyError", "topology", "GraphComm"]


def __getattr__(name):  # lazy: keep mpi4py out of ``import mpidl``
    if name == "GraphComm":
        from mpidl.comm import GraphComm
        return GraphComm
    raise AttributeError(f"module 'mpidl' has no attribute {name!r}")
