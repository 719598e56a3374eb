"""GridComm: the M x K rank grid of the decoupled pipeline (issue 8; see :mod:`mpidl.comm`)."""
from __future__ import annotations

from mpidl.comm.core import _as_array, _device_buffer, _direct, _mpi
from mpidl.comm.graph import GraphComm
from mpidl.errors import MpidlError

class GridError(MpidlError):
    """A grid that does not fit the MPI job (raised on every rank)."""


class GridComm:
    """Collective. An M x K grid of ranks: M data-parallel replicas x K pipeline stages.

    World rank r sits at replica ``m = r // K`` and stage ``k = r % K`` (a
    pipeline is K consecutive ranks, so on a cluster its point-to-point links
    stay inside a node when K divides the ranks per node).  The communicator
    is duplicated first, then split twice:

    * ``stage``: a :class:`GraphComm` over the M copies of stage k (complete
      graph), for the allreduce of the stage's gradient;
    * ``path``: the K stages of replica m (an mpi4py intracommunicator with
      rank k), for the nonblocking point-to-point messages: activations go to
      k + 1, input-gradients to k - 1.

    Buffers are NumPy arrays or torch tensors.  A tensor on a device (or any tensor under
    :data:`mpidl.comm.core.STAGE_CPU_TENSORS`) is staged through its pinned host mirror (a
    device-to-host copy before a send, a host-to-device copy after a receive, in
    :meth:`waitall`); with ``cuda_aware=True`` tensors go to MPI as they are (CUDA-aware MPI),
    and the stage's allreduce is direct too (:class:`GraphComm`).

    ``M * K != size`` raises :class:`GridError` on every rank.  Counters:
    ``link_bytes[+1]`` / ``link_bytes[-1]`` are the bytes this rank sent to
    its successor / predecessor; ``stage.bytes_sent`` the allreduce traffic
    (ring model, see :class:`GraphComm`); ``bytes_sent`` their sum.
    """

    TAG_ACT, TAG_GRAD, TAG_EVAL = 11, 12, 13

    def __init__(self, comm, M: int, K: int, cuda_aware: bool = False, progress: str = "none"):
        size = comm.Get_size()
        M, K = int(M), int(K)
        if M < 1 or K < 1 or M * K != size:
            raise GridError(f"an M x K = {M} x {K} grid needs {M * K} ranks but the MPI job has "
                            f"{size}; start it with mpiexec -n {M * K} or set [algorithm] "
                            f"replicas/stages so that replicas x stages = {size}")
        from mpidl import topology as T
        self.M, self.K = M, K
        self.cuda_aware = bool(cuda_aware)
        self.base = comm.Dup()
        self.rank, self.size = self.base.Get_rank(), size
        self.m, self.k = divmod(self.rank, K)
        split = self.base.Split(self.k, self.m)
        try:
            # the stage's GraphComm owns the progress engine of the pipeline's messages as well
            # (``[comm] progress``: they are tested, or waited on by the thread, while the stage
            # computes; attach the stage's model with ``grid.stage.attach(fm)``)
            self.stage = GraphComm(split, T.complete(M), cuda_aware=self.cuda_aware, progress=progress,
                                   bucket_mb=0)
        finally:
            split.Free()
        self.path = self.base.Split(self.m, self.k)
        self.link_bytes = {+1: 0, -1: 0}
        self.link_messages = {+1: 0, -1: 0}
        self._requests = []
        self._keep = []           # send / receive buffers MPI uses until waitall
        self._writebacks = []     # host mirror -> device copies of staged receives, run by waitall
        self._closed = False

    # -- lifecycle -------------------------------------------------------
    def close(self):
        """Collective. Finish outstanding messages, free the communicators (idempotent)."""
        if self._closed:
            return
        self.waitall()
        self.path.Free()
        self.stage.close()
        self.base.Free()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- errors and global collectives -------------------------------------
    def agree(self, error=None):
        """Collective (all grid ranks). Raise :class:`CollectiveError` everywhere if any rank has an error."""
        GraphComm.agree(self, error)  # uses only self.base

    def bcast(self, obj, root=0):
        """Collective (all grid ranks). Pickled broadcast of a small object from world rank ``root``."""
        return self.base.bcast(obj, root=root)

    def allreduce_stage(self, x, op="mean", out=None):
        """Collective over the M copies of this stage (see :meth:`GraphComm.allreduce`)."""
        return self.stage.allreduce(x, op=op, out=out)

    # -- point to point along the pipeline -----------------------------------
    def _peer(self, direction):
        if direction not in (+1, -1):
            raise ValueError(f"direction must be +1 (successor) or -1 (predecessor), got {direction!r}")
        peer = self.k + direction
        if not 0 <= peer < self.K:
            raise ValueError(f"stage {self.k} of {self.K} has no {'successor' if direction > 0 else 'predecessor'}")
        return peer

    def isend(self, x, direction: int, tag: int):
        """Local. Start sending contiguous ``x`` (array or tensor) to stage k + direction; completes
        in :meth:`waitall`.

        ``x`` must not change until then (a staged tensor is copied to its host mirror here).
        """
        peer = self._peer(direction)
        if _direct(x, self.cuda_aware):
            a = _device_buffer(x)
            nbytes = a.numel() * a.element_size()
        else:
            a, _ = _as_array(x, writable=False)
            nbytes = a.nbytes
        req = self.path.Isend(a, dest=peer, tag=tag)
        self._requests.append(req)
        self.stage.overlap.watch(req)
        self._keep.append(a)
        self.link_bytes[direction] += int(nbytes)
        self.link_messages[direction] += 1
        return req

    def irecv(self, out, direction: int, tag: int):
        """Local. Start receiving into contiguous ``out`` (array or tensor) from stage k + direction.

        ``out`` holds the message after :meth:`waitall` (a staged tensor receives into its host
        mirror, copied to ``out`` there).
        """
        peer = self._peer(direction)
        if _direct(out, self.cuda_aware):
            a, wb = _device_buffer(out), None
        else:
            a, wb = _as_array(out, fill=False)
        req = self.path.Irecv(a, source=peer, tag=tag)
        self._requests.append(req)
        self.stage.overlap.watch(req)
        self._keep.append(a)
        if wb is not None:
            self._writebacks.append(wb)
        return req

    def waitall(self):
        """Local. Complete every message started by :meth:`isend` / :meth:`irecv` (and copy staged
        receives to their tensors)."""
        if self._requests:
            for r in self._requests:
                self.stage.overlap.unwatch(r)
            _mpi().Request.Waitall(self._requests)
            self._requests = []
        writebacks, self._writebacks, self._keep = self._writebacks, [], []
        for wb in writebacks:
            wb()

    def send(self, x, direction: int, tag: int):
        """Local. Blocking send of contiguous ``x`` to stage k + direction."""
        self.isend(x, direction, tag)
        self.waitall()

    def recv(self, out, direction: int, tag: int):
        """Local. Blocking receive into ``out`` from stage k + direction."""
        self.irecv(out, direction, tag)
        self.waitall()
        return out

    @property
    def bytes_sent(self):
        return self.link_bytes[+1] + self.link_bytes[-1] + self.stage.bytes_sent

    def reset_counters(self):
        """Local. Zero every byte / message counter."""
        self.link_bytes = {+1: 0, -1: 0}
        self.link_messages = {+1: 0, -1: 0}
        self.stage.reset_counters()
