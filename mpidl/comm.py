"""GraphComm: graph consensus over MPI neighbour collectives.

This is the only module in mpidl that imports mpi4py.  A :class:`GraphComm`
duplicates a base communicator (so the library's messages never meet the
user's) and builds a distributed-graph communicator from a
:class:`~mpidl.topology.Topology` with ``Create_dist_graph_adjacent``
(``reorder=False``: rank i stays agent i).  One consensus mix,

    x_i <- W_ii x_i + sum_{j in N_i} W_ij x_j                (ALGORITHMS.md section 0)

is ONE ``Neighbor_allgather`` into a preallocated buffer (a persistent request
when the MPI library has MPI-4 persistent collectives) followed by the Numba
combine kernel :func:`mpidl.kernels.combine`.

Buffers: NumPy arrays and CPU torch tensors enter zero-copy (``.numpy()``);
a CUDA tensor is staged through host memory.  float32 and float64, any shape
(contiguous).  Every rank must mix arrays of the same shape and dtype.

Counters: ``bytes_sent`` / ``messages_sent`` count what this rank hands to
MPI for its out-neighbours (exact for neighbour collectives).  An allreduce
is charged the bandwidth-optimal ring model, 2 (n - 1) / n x payload bytes and
2 (n - 1) messages, since its real traffic depends on the MPI library.
"""
from __future__ import annotations

import time
import zlib
from collections import OrderedDict

import numpy as np

from mpidl.errors import MpidlError
from mpidl.kernels.mixing import combine_prepared
from mpidl.topology import Topology, TopologyError

__all__ = ["GraphComm", "ScheduledGraphComm", "Pending", "CollectiveError", "world"]


class CollectiveError(MpidlError):
    """Raised on every rank when any rank reported an error to :meth:`GraphComm.agree`."""


def _mpi():
    """Import MPI lazily: importing mpidl must not initialise MPI."""
    from mpi4py import MPI
    return MPI


def world():
    """Local. ``MPI.COMM_WORLD`` (initialises MPI on first use)."""
    return _mpi().COMM_WORLD


_OPS = ("sum", "mean", "max", "min")


def _as_array(x, writable=True):
    """Flat zero-copy NumPy view of ``x`` plus a write-back callable (or None)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        t = x.detach()
        if t.device.type != "cpu":
            host = t.to("cpu").contiguous()
            return host.numpy().reshape(-1), (lambda: t.copy_(host.view_as(t), non_blocking=False))
        if not t.is_contiguous():
            raise ValueError("GraphComm needs a contiguous tensor (call .contiguous())")
        return t.numpy().reshape(-1), None
    a = np.asarray(x)
    if not a.flags.c_contiguous:
        raise ValueError("GraphComm needs a C-contiguous array (np.ascontiguousarray)")
    if writable and not a.flags.writeable:
        raise ValueError("GraphComm cannot write into a read-only array")
    return a.reshape(-1), None


def _pointers(x, out):
    """Data pointers of two CPU torch tensors / arrays (fast-path validity check)."""
    px = x.data_ptr() if hasattr(x, "data_ptr") else x.__array_interface__["data"][0]
    po = out.data_ptr() if hasattr(out, "data_ptr") else out.__array_interface__["data"][0]
    return px, po


class Pending:
    """Handle of a nonblocking mix; :meth:`wait` completes it and returns ``out``."""

    def __init__(self, gc, plan, x, out, writeback, request):
        self._gc, self._plan, self._x, self._out = gc, plan, x, out
        self._writeback, self._request = writeback, request
        self._done = False

    def test(self) -> bool:
        """Local. True when the communication has finished (wait() is then cheap)."""
        return self._done or bool(self._request.Test())

    def wait(self):
        """Local. Finish the collective, apply the combine kernel, return ``out``."""
        if not self._done:
            self._request.Wait()
            self._plan.busy = False
            self._gc._combine(self._plan, self._x, self._out, self._writeback)
            self._done = True
        return self._out


class _Plan:
    """Preallocated receive buffer (+ persistent request) for one send buffer."""

    __slots__ = ("send", "recv", "w", "w_self", "request", "busy")

    def __init__(self, send, indeg, w_self, w_in):
        self.send = send
        self.recv = np.empty((indeg, send.size), dtype=send.dtype)
        # weights cast once to the data's dtype: the combine stays in that arithmetic
        self.w = np.ascontiguousarray(w_in, dtype=send.dtype)
        self.w_self = send.dtype.type(w_self)
        self.request = None
        self.busy = False


class GraphComm:
    """Collective. Consensus communicator for one agent (= this MPI rank).

    ``GraphComm(comm, topology)`` must be called by every rank of ``comm``
    with the same topology; a size or topology mismatch raises
    :class:`~mpidl.topology.TopologyError` on every rank.  Close it with
    :meth:`close` or use it as a context manager.
    """

    def __init__(self, comm, topology: Topology, *, plan_cache: int = 4, persistent=None):
        MPI = _mpi()
        if not isinstance(topology, Topology):
            raise TypeError(f"topology must be a mpidl.topology.Topology, got {type(topology).__name__}")
        digest = (topology.size, zlib.crc32(topology.weights.tobytes()))
        seen = comm.allgather(digest)
        if topology.size != comm.Get_size():
            raise TopologyError(
                f"topology {topology.name!r} has {topology.size} agents but the MPI job has "
                f"{comm.Get_size()} ranks; start it with mpiexec -n {topology.size} "
                f"or build the topology for {comm.Get_size()} agents")
        if any(d != digest for d in seen):
            bad = next(r for r, d in enumerate(seen) if d != digest)
            raise TopologyError(
                f"ranks disagree on the topology (rank {bad} differs from rank {comm.Get_rank()}); "
                "build it identically everywhere (same generator, size and seed)")
        self.topology = topology
        self.base = comm.Dup()
        self.rank = self.base.Get_rank()
        self.size = self.base.Get_size()
        self.in_neighbors = topology.in_neighbors(self.rank)
        self.out_neighbors = topology.out_neighbors(self.rank)
        self.graph = self.base.Create_dist_graph_adjacent(
            list(self.in_neighbors), list(self.out_neighbors),
            sourceweights=MPI.UNWEIGHTED, destweights=MPI.UNWEIGHTED, reorder=False)
        self._w_self = topology.self_weight(self.rank)
        self._w_in = topology.in_weights(self.rank)
        has_persistent = hasattr(self.graph, "Neighbor_allgather_init")
        self.persistent = has_persistent if persistent is None else (bool(persistent) and has_persistent)
        self._plans: OrderedDict = OrderedDict()
        self._plan_cache = max(1, int(plan_cache))
        self._last = None  # fast path: (x, out, data pointers, plan, a, o) of the last mix
        self.bytes_sent = 0
        self.messages_sent = 0
        self._closed = False

    # -- lifecycle -------------------------------------------------------
    def close(self):
        """Collective. Free requests and communicators (idempotent)."""
        if self._closed:
            return
        for plan in self._plans.values():
            if plan.request is not None:
                plan.request.Free()
        self._plans.clear()
        self._last = None
        self.graph.Free()
        self.base.Free()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def reset_counters(self):
        """Local. Zero ``bytes_sent`` and ``messages_sent``."""
        self.bytes_sent = 0
        self.messages_sent = 0

    # -- consensus -------------------------------------------------------
    def _plan_for(self, a: np.ndarray) -> _Plan:
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"mix needs float32 or float64 data, got {a.dtype}")
        key = (a.__array_interface__["data"][0], a.size, a.dtype.str)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = _Plan(a, len(self.in_neighbors), self._w_self, self._w_in)
        if self.persistent:
            plan.request = self.graph.Neighbor_allgather_init(plan.send, plan.recv)
        self._plans[key] = plan
        while len(self._plans) > self._plan_cache:
            _, old = self._plans.popitem(last=False)
            if self._last is not None and self._last[3] is old:
                self._last = None
            if old.request is not None:
                old.request.Free()
        return plan

    def _start(self, x, out):
        # Fast path: the same x and out objects as the last call (the usual
        # `mix(x, out=x)` loop) reuse its views and plan.  A NumPy array cannot
        # move while we hold it; a torch tensor can (set_, resize_), so its
        # data pointer is compared too.
        last = self._last
        if (last is not None and x is last[0] and out is last[1]
                and (last[2] is None or last[2] == _pointers(x, out))):
            plan, a, o = last[3], last[4], last[5]
            if plan.busy:
                raise RuntimeError("a nonblocking mix of this buffer is still pending; wait() first")
            return self._launch(plan, a, o, out, None)
        a, staged = _as_array(x)
        if out is None:
            o, wb = np.empty_like(a), None
            if type(x).__module__.startswith("torch"):
                import torch
                result = torch.from_numpy(o).view(x.shape).to(x.device)
                if result.device.type != "cpu":  # staged: copy the host result over
                    wb = (lambda r=result, h=o: r.copy_(torch.from_numpy(h).view(r.shape)))
            else:
                result = o.reshape(np.shape(x))
        else:
            o, wb = _as_array(out)
            if o.size != a.size or o.dtype != a.dtype:
                raise ValueError("mix: out must match x in size and dtype")
            result = out
        plan = self._plan_for(a)
        if plan.busy:
            raise RuntimeError("a nonblocking mix of this buffer is still pending; wait() first")
        if out is not None and wb is None and staged is None:  # CPU buffers only
            torchy = type(x).__module__.startswith("torch") or type(out).__module__.startswith("torch")
            self._last = (x, out, _pointers(x, out) if torchy else None, plan, a, o)
        return self._launch(plan, a, o, result, wb)

    def _launch(self, plan, a, o, result, wb):
        if plan.request is not None:
            plan.request.Start()
            request = plan.request
        else:
            request = self.graph.Ineighbor_allgather(plan.send, plan.recv)
        plan.busy = True
        self.bytes_sent += a.nbytes * len(self.out_neighbors)
        self.messages_sent += len(self.out_neighbors)
        return plan, a, o, result, wb, request

    def _combine(self, plan, a, o, writeback):
        combine_prepared(a, plan.recv, plan.w_self, plan.w, o)
        if writeback is not None:
            writeback()

    def mix(self, x, out=None):
        """Collective. Return ``W_ii x + sum_j W_ij x_j`` (into ``out`` if given).

        ``out=x`` mixes in place.  One neighbour collective per call.
        """
        plan, a, o, result, wb, request = self._start(x, out)
        request.Wait()
        plan.busy = False
        self._combine(plan, a, o, wb)
        return result

    def start_mix(self, x, out=None) -> Pending:
        """Collective. Begin a mix; compute, then call ``.wait()`` for the result.

        ``x`` must not be modified until ``wait()`` returns.
        """
        plan, a, o, result, wb, request = self._start(x, out)
        return _PendingResult(self, plan, a, o, wb, request, result)

    # -- point-to-neighbour payloads ------------------------------------
    def exchange(self, send: dict) -> dict:
        """Collective. Send ``send[j]`` to out-neighbour j; return ``{i: array}`` from in-neighbours.

        Payloads may differ in shape and dtype per neighbour; an out-neighbour
        missing from ``send`` gets nothing.  A key that is not an out-neighbour
        is an error on every rank.
        """
        MPI = _mpi()
        bad = [k for k in send if k not in self.out_neighbors]
        self.agree(None if not bad else
                   f"rank {self.rank}: exchange() to {bad}, which are not out-neighbours "
                   f"{list(self.out_neighbors)} of this rank in topology {self.topology.name!r}")
        arrays = {k: np.ascontiguousarray(_as_array(v, writable=False)[0].reshape(np.shape(v)))
                  for k, v in send.items()}
        meta = [(arrays[j].dtype.str, arrays[j].shape) if j in arrays else None
                for j in self.out_neighbors]
        rmeta = self.graph.neighbor_alltoall(meta)
        scounts = [arrays[j].nbytes if j in arrays else 0 for j in self.out_neighbors]
        rcounts = [int(np.prod(m[1])) * np.dtype(m[0]).itemsize if m else 0 for m in rmeta]
        sbuf = np.empty(sum(scounts), dtype=np.uint8)
        off = 0
        for j, c in zip(self.out_neighbors, scounts):
            if c:
                sbuf[off:off + c] = arrays[j].reshape(-1).view(np.uint8)
            off += c
        rbuf = np.empty(sum(rcounts), dtype=np.uint8)
        sdispl = [0] + np.cumsum(scounts).tolist()[:-1] if scounts else []
        rdispl = [0] + np.cumsum(rcounts).tolist()[:-1] if rcounts else []
        self.graph.Neighbor_alltoallv([sbuf, (scounts, sdispl), MPI.BYTE],
                                      [rbuf, (rcounts, rdispl), MPI.BYTE])
        self.bytes_sent += int(sum(scounts))
        self.messages_sent += sum(1 for c in scounts if c)
        result, off = {}, 0
        for i, m, c in zip(self.in_neighbors, rmeta, rcounts):
            if m is not None:
                result[i] = rbuf[off:off + c].view(np.dtype(m[0])).reshape(m[1]).copy()
            off += c
        return result

    # -- global collectives ---------------------------------------------
    def agree(self, error=None):
        """Collective. Raise :class:`CollectiveError` on every rank if any rank passes an error.

        ``error`` is None (all fine here) or a message; the lowest failing
        rank's message is raised everywhere.  Use it before a collective that
        local bad input would otherwise hang.
        """
        MPI = _mpi()
        failed = self.base.allreduce(0 if error is None else 1, op=MPI.SUM)
        if failed:
            msgs = self.base.allgather(None if error is None else str(error))
            first = next(m for m in msgs if m is not None)
            more = f" (and {failed - 1} other rank(s))" if failed > 1 else ""
            raise CollectiveError(first + more)

    def allreduce(self, x, op="sum", out=None):
        """Collective. Elementwise reduction over all ranks (sum, mean, max, min).

        Python and NumPy scalars return a scalar; arrays and tensors return an
        array (``out=x`` reduces in place).
        """
        MPI = _mpi()
        if op not in _OPS:
            raise ValueError(f"unknown op {op!r}; choose one of {_OPS}")
        mop = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        n = self.size
        if np.isscalar(x) or (isinstance(x, np.ndarray) and x.ndim == 0 and out is None):
            v = self.base.allreduce(x.item() if isinstance(x, np.generic) else x, op=mop)
            self._charge_allreduce(8)
            return v / n if op == "mean" else v
        a, _ = _as_array(x, writable=False)
        if out is None:
            o, wb, result = np.empty_like(a), None, None
        else:
            o, wb = _as_array(out)
            result = out
        if o.size != a.size or o.dtype != a.dtype:
            raise ValueError("allreduce: out must match x in size and dtype")
        if np.shares_memory(a, o):
            self.base.Allreduce(MPI.IN_PLACE, o, op=mop)
        else:
            self.base.Allreduce(a, o, op=mop)
        if op == "mean":
            o /= n
        if wb is not None:
            wb()
        self._charge_allreduce(a.nbytes)
        return o.reshape(np.shape(x)) if result is None else result

    def _charge_allreduce(self, nbytes):
        if self.size > 1:
            self.bytes_sent += int(2 * (self.size - 1) * nbytes / self.size)
            self.messages_sent += 2 * (self.size - 1)

    def argmin(self, value):
        """Collective. ``(min value, owner rank)`` over all ranks (MPI MINLOC; ties -> lowest rank)."""
        MPI = _mpi()
        v, r = self.base.allreduce((float(value), self.rank), op=MPI.MINLOC)
        return v, r

    def bcast(self, obj, root=0):
        """Collective. Broadcast from ``root``: arrays/tensors in place, other objects pickled."""
        if isinstance(obj, np.ndarray) or type(obj).__module__.startswith("torch"):
            a, wb = _as_array(obj)
            self.base.Bcast(a, root=root)
            if wb is not None:
                wb()
            if self.rank == root:
                self.bytes_sent += a.nbytes * (self.size - 1)
            return obj
        return self.base.bcast(obj, root=root)

    def barrier(self):
        """Collective. Block until every rank arrives."""
        self.base.Barrier()


class _PendingResult(Pending):
    def __init__(self, gc, plan, a, o, wb, request, result):
        super().__init__(gc, plan, a, o, wb, request)
        self._result = result

    def wait(self):
        super().wait()
        return self._result


class ScheduledGraphComm:
    """Collective. Consensus over a time-varying schedule ``step -> Topology``.

    Keeps one :class:`GraphComm` per distinct topology (at most ``cache``;
    the least recently used is closed when full).  Every rank evaluates the
    same schedule at the same step, so creation and eviction stay collective.
    """

    def __init__(self, comm, schedule, *, cache=8):
        self.comm = comm
        self.schedule = schedule
        self._cache: OrderedDict = OrderedDict()
        self._max = max(1, int(cache))
        self._retired_bytes = 0
        self._retired_messages = 0
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def at(self, step: int) -> GraphComm:
        topo = self.schedule(step)
        gc = self._cache.get(topo)
        if gc is None:
            gc = GraphComm(self.comm, topo)
            self._cache[topo] = gc
            while len(self._cache) > self._max:
                _, old = self._cache.popitem(last=False)
                self._retired_bytes += old.bytes_sent
                self._retired_messages += old.messages_sent
                old.close()
        else:
            self._cache.move_to_end(topo)
        return gc

    def mix(self, x, step: int, out=None):
        """Collective. Mix with the topology of ``step``."""
        return self.at(step).mix(x, out=out)

    @property
    def bytes_sent(self):
        return self._retired_bytes + sum(g.bytes_sent for g in self._cache.values())

    @property
    def messages_sent(self):
        return self._retired_messages + sum(g.messages_sent for g in self._cache.values())

    def close(self):
        for gc in self._cache.values():
            gc.close()
        self._cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ===========================================================================
# Leader SGD / EASGD communicators (issue 9).  Everything below belongs to
# mpidl.algorithms.lsgd: a world/group pair of communicators with leader
# election (MINLOC), leader broadcast, the EASGD sum, a nonblocking barrier for
# asynchronous rounds, and ModelWindow, a one-sided (RMA) slot holding one model.
# ===========================================================================

class LeaderComm:
    """Collective. World and group communicators of the leader-based methods.

    ``LeaderComm(gc, groups, group_size)`` duplicates ``gc.base`` (all ranks)
    and splits it into groups: ``groups="all"`` one group of every rank,
    ``"size"`` consecutive blocks of ``group_size`` ranks (must divide the
    world size), ``"node"`` one group per shared-memory node
    (``Split_type(COMM_TYPE_SHARED)``).  Bytes handed to MPI are charged to
    ``gc.bytes_sent`` / ``gc.messages_sent`` so the driver's counters include them.
    """

    def __init__(self, gc, groups="all", group_size=0):
        MPI = _mpi()
        self.gc = gc
        self.world = gc.base.Dup()
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        if groups == "all":
            color = 0
        elif groups == "size":
            if group_size < 1 or self.size % group_size:
                self.world.Free()
                raise MpidlError(f"group_size {group_size} does not divide the {self.size} workers; "
                                 f"choose a divisor of {self.size} (or groups = \"node\" / \"all\")")
            color = self.rank // group_size
        elif groups == "node":
            node = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            color = node.allreduce(self.rank, op=MPI.MIN)
            node.Free()
        else:
            self.world.Free()
            raise MpidlError(f"groups must be all, size or node, got {groups!r}")
        self.group = self.world.Split(color, key=self.rank)
        self.group_id = color
        self.grank, self.gsize = self.group.Get_rank(), self.group.Get_size()
        self.group_ranks = self.group.allgather(self.rank)   # group rank -> world rank
        self.n_groups = self.world.allreduce(1 if self.grank == 0 else 0, op=MPI.SUM)
        self._windows = []
        self._closed = False

    def _scope(self, scope):
        return self.world if scope == "world" else self.group

    def charge(self, nbytes, messages=1):
        """Local. Add bytes this rank handed to MPI to the driver's counters."""
        self.gc.bytes_sent += int(nbytes)
        self.gc.messages_sent += int(messages)

    def elect(self, value, scope="world"):
        """Collective over ``scope`` ("world" or "group"). ``(min value, its rank in scope)``.

        One MINLOC allreduce; ties go to the lowest rank, so every rank agrees.
        """
        MPI = _mpi()
        c = self._scope(scope)
        n = c.Get_size()
        v, r = c.allreduce((float(value), c.Get_rank()), op=MPI.MINLOC)
        if n > 1:
            self.charge(2 * (n - 1) * 16 // n, 2 * (n - 1))
        return v, r

    def bcast(self, x, root, scope="world"):
        """Collective over ``scope``. Broadcast array ``x`` in place from ``root`` (rank in scope)."""
        c = self._scope(scope)
        a, wb = _as_array(x)
        c.Bcast(a, root=root)
        if wb is not None:
            wb()
        if c.Get_rank() == root and c.Get_size() > 1:
            self.charge(a.nbytes * (c.Get_size() - 1), c.Get_size() - 1)
        return x

    def allreduce_sum(self, x, out):
        """Collective over the world. ``out = sum_i x_i`` (ring-model bytes charged)."""
        MPI = _mpi()
        a, _ = _as_array(x, writable=False)
        o, _ = _as_array(out)
        if np.shares_memory(a, o):
            self.world.Allreduce(MPI.IN_PLACE, o, op=MPI.SUM)
        else:
            self.world.Allreduce(a, o, op=MPI.SUM)
        if self.size > 1:
            self.charge(2 * (self.size - 1) * a.nbytes // self.size, 2 * (self.size - 1))
        return out

    def barrier(self):
        """Collective over the world. Block until every rank arrives."""
        self.world.Barrier()

    def ibarrier(self):
        """Collective over the world (nonblocking). A request; ``.Test()`` is True once all ranks entered."""
        return self.world.Ibarrier()

    def window(self, count, dtype, scope="world", init=None):
        """Collective over ``scope``. A :class:`ModelWindow` of ``count`` values hosted by rank 0 of ``scope``."""
        w = ModelWindow(self._scope(scope), count, dtype, self, init=init)
        self._windows.append(w)
        return w

    def close(self):
        """Collective. Free the windows and communicators (idempotent)."""
        if self._closed:
            return
        for w in self._windows:
            w.free()
        self._windows.clear()
        self.group.Free()
        self.world.Free()
        self._closed = True


class TornReadError(MpidlError):
    """A model read from a ModelWindow kept changing while it was read (should never happen)."""


class ModelWindow:
    """Collective to build and free. One model in an MPI RMA window hosted by rank 0 of ``comm``.

    Every rank holds one passive-target epoch (``Lock_all``) on the window for
    its whole life; all synchronisation is built from MPI atomics, which MPI
    completes without the host's participation where the hardware or shared
    memory allows it (a host busy in a long backward pass does not stall the
    others; see docs/algorithms/lsgd.md for the measurement and the progress
    settings).

    Host memory (bytes): ``mutex`` (int64: 0 free, else owner rank + 1),
    ``seq`` (int64: writes completed, 0 = empty), ``writing`` (int64: the
    newest write begun), then two slots, each ``[version, loss, owner, step]``
    (float64) + the model.

    * Writers take the mutex (compare-and-swap spin with backoff), announce
      ``writing = s + 1`` (atomic, flushed), write version ``s + 1`` into slot
      ``(s + 1) mod 2`` (the slot readers are not being sent to), flush, then
      publish ``seq = s + 1`` (atomic).
    * Readers take no lock (a versioned double buffer): atomically read
      ``s1 = seq``, get slot ``s1 mod 2``, flush, atomically read
      ``w = writing``.  Only write ``s1 + 2`` touches that slot, and it is
      announced before its first byte lands, so the read is valid iff
      ``w <= s1 + 1`` and the slot's own version is ``s1``; otherwise it is
      retried (counted in ``retries``).  A torn model is never returned.
    """

    HDR = 32
    OFF = 24

    def __init__(self, comm, count, dtype, lc, init=None):
        MPI = _mpi()
        self.comm, self.lc = comm, lc
        self.dtype = np.dtype(dtype)
        self.count = int(count)
        self.nbytes = self.count * self.dtype.itemsize
        self.slot = self.HDR + self.nbytes
        self.is_host = comm.Get_rank() == 0
        size = self.OFF + 2 * self.slot if self.is_host else 0
        self.win = MPI.Win.Allocate(size, 1, comm=comm)
        if self.is_host:
            np.frombuffer(self.win.tomemory(), dtype=np.uint8)[:self.OFF + self.HDR] = 0
        comm.Barrier()
        self.win.Lock_all()
        self._i64 = np.zeros(1, np.int64)
        self._res = np.zeros(1, np.int64)
        self._hdr = np.zeros(4)
        self.retries = 0
        self.writes = 0
        self._freed = False
        if self.is_host and init is not None:
            self._lock()
            self._write(0, (0.0, 0.0, 0.0), np.asarray(init, self.dtype))
            self._unlock()
        comm.Barrier()

    # atomics ---------------------------------------------------------
    def _atomic(self, disp, value=None):
        """Fetch the int64 at ``disp`` (and replace it with ``value`` if given); flushed."""
        MPI = _mpi()
        self._i64[0] = 0 if value is None else value
        self.win.Fetch_and_op(self._i64, self._res, 0, disp, MPI.NO_OP if value is None else MPI.REPLACE)
        self.win.Flush(0)
        return int(self._res[0])

    def _lock(self):
        me = np.array([self.comm.Get_rank() + 1], np.int64)
        free = np.zeros(1, np.int64)
        pause = 1e-6
        while True:
            self.win.Compare_and_swap(me, free, self._res, 0, 0)
            self.win.Flush(0)
            if self._res[0] == 0:
                return
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def _unlock(self):
        self._atomic(0, 0)

    # slots ------------------------------------------------------------
    def _get_slot(self, s, out):
        MPI = _mpi()
        off = self.OFF + (s % 2) * self.slot
        self.win.Get([self._hdr.view(np.uint8), MPI.BYTE], 0, (off, self.HDR, MPI.BYTE))
        self.win.Get([out.view(np.uint8), MPI.BYTE], 0, (off + self.HDR, self.nbytes, MPI.BYTE))
        self.win.Flush(0)

    def _write(self, s, meta, x):
        """Write version s + 1 (mutex held): fill the other slot, flush, publish seq."""
        MPI = _mpi()
        off = self.OFF + ((s + 1) % 2) * self.slot
        self._atomic(16, s + 1)
        h = np.array([s + 1, *meta], dtype=np.float64)
        self.win.Put([h.view(np.uint8), MPI.BYTE], 0, (off, self.HDR, MPI.BYTE))
        self.win.Put([np.ascontiguousarray(x, self.dtype).view(np.uint8), MPI.BYTE], 0,
                     (off + self.HDR, self.nbytes, MPI.BYTE))
        self.win.Flush(0)
        self._atomic(8, s + 1)
        self.writes += 1
        self.lc.charge(self.slot + 8, 2)

    def _check(self, out):
        if out.dtype != self.dtype or out.size != self.count or not out.flags.c_contiguous:
            raise ValueError(f"ModelWindow holds {self.count} {self.dtype} values; got {out.dtype} x {out.size}")

    # public operations -------------------------------------------------
    def read(self, out, charge=True, retries=100000):
        """Local (no lock; versioned double buffer). Copy the newest model into ``out``.

        Returns its header ``(seq, loss, owner, step)``, or None while the slot is empty.
        """
        self._check(out)
        for _ in range(retries):
            s1 = self._atomic(8)
            if s1 == 0:
                return None
            self._get_slot(s1, out)
            s2 = self._atomic(16)
            if charge:
                self.lc.charge(self.slot + 16, 3)
            if s2 <= s1 + 1 and int(self._hdr[0]) == s1:
                return tuple(float(v) for v in self._hdr)
            self.retries += 1
        raise TornReadError(f"{retries} consecutive reads of a model window were overtaken by writers")

    def exchange(self, x, loss, owner, step, decide, out):
        """Local (mutex). Publish ``x`` if ``decide(header)``, else read the published model into ``out``.

        ``decide`` gets ``None`` (empty) or the current ``(seq, loss, owner, step)``.
        Returns ``(published, header)``, the header of what is now published.
        """
        self._check(out)
        self._lock()
        try:
            s = self._atomic(8)
            cur = None
            if s:
                self._get_hdr(s)
                cur = tuple(float(v) for v in self._hdr)
            if decide(cur):
                self._write(s, (loss, owner, step), x)
                return True, (float(s + 1), float(loss), float(owner), float(step))
            self._get_slot(s, out)
            self.lc.charge(self.HDR + 16, 3)
            return False, tuple(float(v) for v in self._hdr)
        finally:
            self._unlock()

    def _get_hdr(self, s):
        MPI = _mpi()
        off = self.OFF + (s % 2) * self.slot
        self.win.Get([self._hdr.view(np.uint8), MPI.BYTE], 0, (off, self.HDR, MPI.BYTE))
        self.win.Flush(0)

    def update(self, fn, buf):
        """Local (mutex). ``buf <- published model``; ``fn(buf)`` edits it; publish the result.

        Atomic with respect to every other writer (EASGD's center update
        c <- c + a (x_i - c)); readers see the old or the new model, never a mix.
        """
        self._check(buf)
        self._lock()
        try:
            s = self._atomic(8)
            if s:
                self._get_slot(s, buf)
                meta = tuple(float(v) for v in self._hdr[1:])
            else:
                buf[...] = 0
                meta = (0.0, 0.0, 0.0)
            fn(buf)
            self._write(s, meta, buf)
            self.lc.charge(self.slot + 16, 3)
        finally:
            self._unlock()
        return buf

    def free(self):
        """Collective over the window's communicator."""
        if not self._freed:
            self.comm.Barrier()
            self.win.Unlock_all()
            self.win.Free()
            self._freed = True
