"""Local helpers shared by the communicators: lazy MPI, the launch check, buffer conversion."""
from __future__ import annotations

from collections import OrderedDict

from dataclasses import dataclass

import numpy as np

from mpidl.errors import MpidlError

class CollectiveError(MpidlError):
    """Raised on every rank when any rank reported an error to :meth:`GraphComm.agree`."""


class LaunchError(MpidlError):
    """The launcher started N > 1 tasks but each sees an MPI world of 1 (launcher/MPI mismatch).

    ``launcher_rank`` is this task's rank as the launcher numbered it (or
    None), so that only task 0 prints the message.
    """

    def __init__(self, msg, launcher_rank=None):
        super().__init__(msg)
        self.launcher_rank = launcher_rank


def _mpi():
    """Import MPI lazily: importing mpidl must not initialise MPI."""
    from mpi4py import MPI
    return MPI


def world():
    """Local. ``MPI.COMM_WORLD`` (initialises MPI on first use)."""
    return _mpi().COMM_WORLD


def init_world():
    """Local. Initialise MPI for a program's start and return ``COMM_WORLD``, refusing a bad launch.

    The launcher is checked twice (:func:`mpidl.launch.launch_mismatch`):
    before ``MPI_Init``, where the environment alone proves a mismatch that
    would make the library abort in ``MPI_Init`` with its own error (MPICH
    under Open MPI's mpiexec, Open MPI under srun without a PMI plugin), and
    after it (:func:`check_launch`).  Raises :class:`LaunchError`.  When
    mpi4py already initialised MPI (``python -m mpi4py``), only the second
    check runs.
    """
    import sys
    import mpi4py
    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False  # look at the launcher before MPI_Init
        mpi4py.rc.finalize = True     # ... and still finalise at exit, as mpi4py would
    MPI = _mpi()
    if not MPI.Is_initialized():
        from mpidl.launch import launch_mismatch
        found = launch_mismatch(None, MPI.Get_library_version(), mpicc=_mpicc())
        if found is not None:
            raise LaunchError(*found)
        levels = {"single": MPI.THREAD_SINGLE, "funneled": MPI.THREAD_FUNNELED,
                  "serialized": MPI.THREAD_SERIALIZED, "multiple": MPI.THREAD_MULTIPLE}
        MPI.Init_thread(levels.get(str(mpi4py.rc.thread_level), MPI.THREAD_MULTIPLE))
    comm = MPI.COMM_WORLD
    check_launch(comm)
    return comm


def _mpicc():
    import mpi4py
    try:
        return (mpi4py.get_config() or {}).get("mpicc")
    except Exception:  # noqa: BLE001 (no build config: the hint falls back to a guess)
        return None


def check_launch(comm) -> None:
    """Local. Raise :class:`LaunchError` when ``comm`` is a singleton world of an N-task launch.

    Call it where the program starts, before any file is written; the rules
    are in :func:`mpidl.launch.launch_mismatch`.
    """
    if comm.Get_size() != 1:
        return
    from mpidl.launch import launch_mismatch
    found = launch_mismatch(1, _mpi().Get_library_version(), mpicc=_mpicc())
    if found is not None:
        raise LaunchError(*found)


@dataclass(frozen=True)
class NodeInfo:
    """Where a rank runs, from one shared-memory split (computed once, handed to whoever needs it:
    ``groups = "node"``, the rank -> GPU mapping, placement checks).

    ``local_rank``/``local_size``: this rank's index among the ranks of its node and their number;
    ``node``: the node's index, nodes numbered by their lowest world rank; ``n_nodes``: how many
    nodes the communicator spans; ``leader``: the lowest world rank on this node;
    ``local_tags``: the ``local_tag`` of every rank on the node, in node-rank order."""

    local_rank: int
    local_size: int
    node: int
    n_nodes: int
    leader: int
    local_tags: tuple = ()


def node_info(comm, local_tag=None) -> NodeInfo:
    """Collective over ``comm`` (mpi4py). This rank's :class:`NodeInfo`, from
    ``Split_type(COMM_TYPE_SHARED)`` (ordered by rank): the MPI's own idea of a node (the ranks
    that can share memory), never a guess from host names or the environment."""
    MPI = _mpi()
    rank = comm.Get_rank()
    shm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        local_rank, local_size = shm.Get_rank(), shm.Get_size()
        tags = tuple(shm.allgather((rank, local_tag)))
    finally:
        shm.Free()
    leader = min(r for r, _ in tags)
    leaders = sorted(set(comm.allgather(leader)))
    return NodeInfo(local_rank, local_size, leaders.index(leader), len(leaders), leader,
                    tuple(t for _, t in tags))


def node_split(comm, local_tag=None):
    """Collective over ``comm`` (mpi4py). ``(node rank, node size, [local_tag of every rank on the
    node])``: the first fields of :func:`node_info`."""
    info = node_info(comm, local_tag)
    return info.local_rank, info.local_size, list(info.local_tags)


def allgather_objects(comm, obj) -> list:
    """Collective over ``comm`` (mpi4py). Every rank's ``obj``, on a duplicate of ``comm`` so the
    library's message never meets the user's."""
    dup = comm.Dup()
    try:
        return dup.allgather(obj)
    finally:
        dup.Free()


_OPS = ("sum", "mean", "max", "min")


def _persistent_collectives(graph) -> bool:
    """Collective over ``graph``. Whether persistent neighbour collectives work, agreed by all ranks.

    mpi4py always defines ``Neighbor_allgather_init``, but a library without
    MPI-4 persistent collectives (Open MPI 4.x reports MPI 3.1) raises
    NotImplementedError when it is called.  So every rank makes one trial
    request on a one-element buffer (freed unstarted) and the ranks take the
    logical AND: either all use persistent requests or all fall back to
    ``Ineighbor_allgather``.
    """
    MPI = _mpi()
    ok = hasattr(graph, "Neighbor_allgather_init")
    if ok:
        indeg = graph.Get_dist_neighbors_count()[0]
        send, recv = np.zeros(1), np.zeros(max(1, indeg))
        try:
            req = graph.Neighbor_allgather_init([send, 1, MPI.DOUBLE], [recv, 1, MPI.DOUBLE])
            req.Free()
        except (NotImplementedError, MPI.Exception):
            ok = False
    return bool(graph.allreduce(ok, op=MPI.LAND))


class _Stage:
    """A pinned host mirror of one device tensor (flat), reused by every operation on that tensor.

    ``event`` marks the last host-to-device copy out of the mirror: the mirror is
    not written again (by a copy in, by MPI or by a combine) before it completed.
    """

    __slots__ = ("host", "array", "event")

    def __init__(self, t):
        import torch
        self.host = torch.empty(t.numel(), dtype=t.dtype, pin_memory=t.device.type == "cuda")
        self.array = self.host.numpy()
        self.event = None

    def ready(self):
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def fill(self, t):
        """Device -> host (blocking: the mirror is valid on return)."""
        self.ready()
        self.host.copy_(t.reshape(-1))

    def back(self, t):
        """Host -> device, asynchronous (pinned source; later work on t's stream is ordered after it)."""
        import torch
        t.copy_(self.host.view(t.shape), non_blocking=True)
        if t.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()


_STAGES = OrderedDict()
_STAGE_CACHE = 16
STAGE_CPU_TENSORS = False
"""Tests set it: CPU tensors then take the staging path a device tensor takes (own host mirror,
copies in and out), so that path runs on machines without a GPU."""


def _stage(t) -> _Stage:
    """Local. The host mirror of device tensor ``t`` (cached by data pointer, size, dtype and device)."""
    key = (t.data_ptr(), t.numel(), t.dtype, str(t.device))
    st = _STAGES.get(key)
    if st is None:
        st = _STAGES[key] = _Stage(t)
        while len(_STAGES) > _STAGE_CACHE:
            _, old = _STAGES.popitem(last=False)
            old.ready()
    else:
        _STAGES.move_to_end(key)
    return st


def _as_array(x, writable=True, fill=True):
    """Flat zero-copy NumPy view of ``x`` plus a write-back callable (or None).

    A device tensor is staged through its pinned host mirror (:class:`_Stage`): one
    device-to-host copy here (skipped with ``fill=False``, for a buffer the caller
    only writes) and, through the write-back, one host-to-device copy.
    """
    mod = type(x).__module__
    if mod.startswith("torch"):
        t = x.detach()
        if t.device.type != "cpu" or STAGE_CPU_TENSORS:
            if not t.is_contiguous():
                raise ValueError("GraphComm needs a contiguous tensor (call .contiguous())")
            st = _stage(t)
            if fill:
                st.fill(t)
            else:
                st.ready()
            return st.array, ((lambda: st.back(t)) if writable else None)
        if not t.is_contiguous():
            raise ValueError("GraphComm needs a contiguous tensor (call .contiguous())")
        return t.numpy().reshape(-1), None
    a = np.asarray(x)
    if not a.flags.c_contiguous:
        raise ValueError("GraphComm needs a C-contiguous array (np.ascontiguousarray)")
    if writable and not a.flags.writeable:
        raise ValueError("GraphComm cannot write into a read-only array")
    return a.reshape(-1), None


def _staged(x) -> bool:
    """Local. Whether ``x`` reaches MPI through host memory it does not own (a device tensor,
    or any tensor under :data:`STAGE_CPU_TENSORS`) rather than zero-copy."""
    return type(x).__module__.startswith("torch") and (x.device.type != "cpu" or STAGE_CPU_TENSORS)


def _direct(x, cuda_aware) -> bool:
    """Local. Whether ``x`` goes to MPI as it is (a tensor, with a CUDA-aware MPI) instead of staged."""
    return bool(cuda_aware) and type(x).__module__.startswith("torch")


def _device_buffer(x):
    """Local. ``x`` (a contiguous tensor) flat, ready to hand to a CUDA-aware MPI.

    mpi4py takes it through ``__cuda_array_interface__`` / DLPack.  The device's
    queued work is finished first: MPI reads and writes the memory outside
    torch's stream order.
    """
    t = x.detach()
    if not t.is_contiguous():
        raise ValueError("GraphComm needs a contiguous tensor (call .contiguous())")
    if t.device.type == "cuda":
        import torch
        torch.cuda.current_stream(t.device).synchronize()
    return t.reshape(-1)


def _pointers(x, out):
    """Data pointers of two CPU torch tensors / arrays (fast-path validity check)."""
    px = x.data_ptr() if hasattr(x, "data_ptr") else x.__array_interface__["data"][0]
    po = out.data_ptr() if hasattr(out, "data_ptr") else out.__array_interface__["data"][0]
    return px, po
