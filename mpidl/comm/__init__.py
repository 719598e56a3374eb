"""mpidl.comm: every MPI call mpidl makes lives in this package (the only mpi4py importer).

Modules, one concept each:

* :mod:`mpidl.comm.core`: lazy MPI import (``import mpidl`` makes no MPI call), ``world()``,
  the launch check (``init_world``/``check_launch``: N singleton worlds are an error), buffer
  conversion (NumPy / torch tensors, zero-copy), errors.
* :mod:`mpidl.comm.graph`: :class:`GraphComm`, graph consensus over a dist-graph communicator
  (``mix``, ``start_mix``, ``exchange``/``start_exchange``, allreduce, argmin, bcast, agree) and
  :class:`ScheduledGraphComm` for time-varying graphs.  Used by the consensus families, pdADMM
  (a path of layers) and as every family's control communicator.
* :mod:`mpidl.comm.grid`: :class:`GridComm`, the M x K replicas x stages grid of the decoupled
  pipeline (``Split`` into stage groups and pipeline paths; nonblocking point-to-point links).
* :mod:`mpidl.comm.overlap`: :class:`Overlap`, progress of pending requests while torch computes
  (``[comm] progress``: hooks or a thread) and the gradient buckets of ``centralized``
  (``[comm] bucket_mb``), attached to a model with ``GraphComm.attach(fm)``.
* :mod:`mpidl.comm.leader`: :class:`LeaderComm` (groups, MINLOC leader election, leader
  broadcast) and :class:`ModelWindow` (a one-sided RMA slot holding one model) for Leader SGD
  and EASGD.

The overview of :class:`GraphComm`:

A :class:`GraphComm`
duplicates a base communicator (so the library's messages never meet the
user's) and builds a distributed-graph communicator from a
:class:`~mpidl.topology.Topology` with ``Create_dist_graph_adjacent``
(``reorder=False``: rank i stays agent i).  One consensus mix,

    x_i <- W_ii x_i + sum_{j in N_i} W_ij x_j                (ALGORITHMS.md section 0)

is ONE ``Neighbor_allgather`` into a preallocated buffer (a persistent request
when the MPI library has MPI-4 persistent collectives) followed by the Numba
combine kernel :func:`mpidl.kernels.combine`.

Buffers: NumPy arrays and CPU torch tensors enter zero-copy (``.numpy()``);
a CUDA tensor is staged through pinned host memory (a mix in chunks whose copies
overlap the other chunks' communication), or handed to MPI as it is with
``cuda_aware=True`` (a CUDA-aware MPI; the mix is then combined on the device).
float32 and float64, any shape (contiguous).  Every rank must mix arrays of the
same shape and dtype.  A NumPy buffer's persistent collective is made on its first
mix and reused while the same buffer comes back (the algorithms mix the same state
buffers every step); MPI-4 wants every rank to make it at the same call, so mix
long-lived buffers rather than a fresh array per call.  Tensors that are staged or
handed over directly get plans keyed by size, not address, and have no such rule.

Counters: ``bytes_sent`` / ``messages_sent`` count what this rank hands to
MPI for its out-neighbours (exact for neighbour collectives).  An allreduce
is charged the bandwidth-optimal ring model, 2 (n - 1) / n x payload bytes and
2 (n - 1) messages, since its real traffic depends on the MPI library.
"""
from mpidl.comm.core import (CollectiveError, LaunchError, check_launch, init_world,  # noqa: F401
                             world)
from mpidl.comm.graph import Exchange, GraphComm, Pending, ScheduledGraphComm  # noqa: F401
from mpidl.comm.grid import GridComm, GridError  # noqa: F401
from mpidl.comm.leader import LeaderComm, ModelWindow, TornReadError  # noqa: F401

__all__ = ["GraphComm", "ScheduledGraphComm", "Pending", "Exchange", "CollectiveError", "LaunchError",
           "world", "init_world", "check_launch", "GridComm", "GridError", "LeaderComm", "ModelWindow",
           "TornReadError"]
