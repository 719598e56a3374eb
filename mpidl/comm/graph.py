"""GraphComm: graph consensus over MPI neighbour collectives (see :mod:`mpidl.comm`)."""
from __future__ import annotations

import zlib
from collections import OrderedDict

import numpy as np

from mpidl.comm.core import (_OPS, CollectiveError, _as_array, _device_buffer, _direct, _mpi,
                             _persistent_collectives, _pointers, _staged)
from mpidl.comm.overlap import DEFAULT_BUCKET_MB, Overlap
from mpidl.kernels.mixing import combine_prepared
from mpidl.topology import Topology, TopologyError

class Pending:
    """Handle of a nonblocking mix; :meth:`wait` completes it and returns ``out``."""

    def __init__(self, gc, plan, x, out, writeback, request):
        self._gc, self._plan, self._x, self._out = gc, plan, x, out
        self._writeback, self._request = writeback, request
        self._done = False

    def test(self) -> bool:
        """Local. True when the communication has finished (wait() is then cheap)."""
        return self._done or self._gc.overlap.test(self._request)

    def wait(self):
        """Local. Finish the collective, apply the combine kernel, return ``out``."""
        if not self._done:
            self._gc.overlap.unwatch(self._request)
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


class _TensorPlan:
    """CUDA-aware mixing of tensors of one size: the caller's tensor goes to MPI as it is, the
    neighbours' copies land in a receive tensor on the same device and the combine runs there in
    torch (no host copy at all).  Nonblocking, not persistent: the send buffer is the caller's."""

    __slots__ = ("send", "recv", "w", "w_self", "request", "busy")

    def __init__(self, send, indeg, w_self, w_in):
        import torch
        self.send = None
        self.recv = torch.empty((indeg, send.numel()), dtype=send.dtype, device=send.device)
        self.w = [torch.tensor(float(w), dtype=send.dtype, device=send.device) for w in w_in]
        self.w_self = torch.tensor(float(w_self), dtype=send.dtype, device=send.device)
        self.request = None
        self.busy = False


def _free_plan(plan):
    if isinstance(plan, _StagedPlan):
        plan.free()
    elif plan.request is not None:
        plan.request.Free()


class _StagedPlan:
    """Staged mixing of device tensors of one size: a pinned host buffer cut into chunks of at
    most ``chunk`` elements, each chunk with its own receive buffer and (persistent) neighbour
    collective, so that one chunk's copy overlaps another chunk's communication:

    * start: every chunk's device-to-host copy is queued at once (asynchronous into pinned
      memory), and chunk c's collective starts as soon as its copy has landed;
    * wait: chunk c's collective is completed, its combine runs on the host (in place in the
      buffer) and its host-to-device copy is queued while chunk c + 1 is still being waited
      for and combined.

    One copy each way per mix; the combine is elementwise, so the result does not depend on the
    chunking (bitwise).  The byte and message counters count one mix, as for host buffers.
    """

    __slots__ = ("host", "chunks", "busy", "event", "request")

    def __init__(self, gc, t, chunk):
        import torch
        n = t.numel()
        self.host = torch.empty(n, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        arr = self.host.numpy()
        self.chunks = []
        for a in range(0, max(n, 1), max(int(chunk), 1)):
            b = min(n, a + int(chunk))
            p = _Plan(arr[a:b], len(gc.in_neighbors), gc._w_self, gc._w_in)
            if gc.persistent:
                p.request = gc.graph.Neighbor_allgather_init(p.send, p.recv)
            self.chunks.append((a, b, p))
        self.busy = False
        self.event = None           # the last host-to-device copy out of ``host``
        self.request = None         # (GraphComm's plan-cache protocol: freed through free())

    def free(self):
        for _, _, p in self.chunks:
            if p.request is not None:
                p.request.Free()
                p.request = None


class _StagedMix:
    """The request of one staged mix: ``Wait()`` completes it chunk by chunk (see :class:`_StagedPlan`)."""

    def __init__(self, plan, requests, result):
        self.plan, self.requests, self.result = plan, requests, result

    def Test(self):
        return all(r.Test() for r in self.requests if r is not None)

    def Wait(self):
        import torch
        plan, res = self.plan, self.result
        flat = (res.detach() if torch.is_tensor(res) else torch.from_numpy(np.asarray(res))).reshape(-1)
        cuda = flat.device.type == "cuda"
        for (a, b, p), r in zip(plan.chunks, self.requests):
            r.Wait()
            combine_prepared(p.send, p.recv, p.w_self, p.w, p.send)
            flat[a:b].copy_(plan.host[a:b], non_blocking=cuda)
        if cuda:
            plan.event = torch.cuda.Event()
            plan.event.record()
        self.requests = []


def combine_torch(x, recv, w_self, w, out):
    """Local. ``out = w_self x + sum_j w[j] recv[j]`` for tensors, in x's dtype and in the order of the
    Numba kernel (:func:`mpidl.kernels.mixing.combine`): ``w_self x + w0 r0 + w1 r1``, then the other
    rows one by one, each product rounded before its sum (no fused multiply-add), so the bits equal
    the kernel's on the CPU.  ``w_self`` and ``w[j]`` are 0-d tensors of x's dtype; ``out`` may be
    ``x``.  No temporary: the rows of ``recv`` (scratch, refilled by the next collective) are scaled
    in place."""
    import torch
    torch.mul(x, w_self, out=out)
    for j in range(recv.shape[0]):
        r = recv[j]
        r.mul_(w[j])
        out.add_(r)
    return out


class GraphComm:
    """Collective. Consensus communicator for one agent (= this MPI rank).

    ``GraphComm(comm, topology)`` must be called by every rank of ``comm``
    with the same topology; a size or topology mismatch raises
    :class:`~mpidl.topology.TopologyError` on every rank.  Close it with
    :meth:`close` or use it as a context manager.

    ``cuda_aware=True`` hands torch tensors to MPI as they are (device memory to a
    CUDA-aware MPI; see :func:`mpidl.device.cuda_aware_support`) and combines a mix
    on their device; otherwise a device tensor is staged through pinned host
    memory, one copy each way: a mix in chunks of ``stage_chunk`` bytes whose
    copies overlap the other chunks' communication (:class:`_StagedPlan`), the
    other operations through a host mirror (:func:`mpidl.comm.core._as_array`).
    NumPy arrays always take the host path.
    """

    def __init__(self, comm, topology: Topology, *, plan_cache: int = 4, persistent=None, cuda_aware=False,
                 stage_chunk: int = 8 << 20, progress: str = "none", bucket_mb: float = DEFAULT_BUCKET_MB,
                 overlap: Overlap | None = None):
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
        want = True if persistent is None else bool(persistent)
        self.persistent = want and _persistent_collectives(self.graph)
        self._plans: OrderedDict = OrderedDict()
        self._plan_cache = max(1, int(plan_cache))
        self._last = None  # fast path: (x, out, data pointers, plan, a, o) of the last mix
        self.bytes_sent = 0
        self.messages_sent = 0
        self.cuda_aware = bool(cuda_aware)
        self.stage_chunk = int(stage_chunk)      # bytes per chunk of a staged mix
        # progress of pending requests during backward, gradient buckets (mpidl.comm.overlap);
        # a shared ``overlap`` (a schedule's communicators share their base's) is not closed here
        self._own_overlap = overlap is None
        self.overlap = Overlap(progress, bucket_mb) if overlap is None else overlap
        self._closed = False

    # -- lifecycle -------------------------------------------------------
    def close(self):
        """Collective. Free requests and communicators (idempotent)."""
        if self._closed:
            return
        for plan in self._plans.values():
            _free_plan(plan)
        self._plans.clear()
        self._last = None
        if self._own_overlap:
            self.overlap.close()
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
        return self._keep(key, plan)

    def _tensor_plan(self, kind, t):
        """The plan for mixing tensor ``t`` by ``kind`` ("staged": through the plan's own pinned
        host buffer; "direct": ``t`` itself to a CUDA-aware MPI).

        Keyed by (kind, size, dtype, device) and the first plan of that key not in use, never
        by the tensor's address: every rank then picks the same plan for the same call (the
        address of a fresh tensor differs between ranks), so the collective a new persistent
        plan starts with is made by every rank or by none.
        """
        import torch
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"mix needs float32 or float64 data, got {t.dtype}")
        slot = 0
        while True:
            key = (kind, t.numel(), str(t.dtype), str(t.device), slot)
            plan = self._plans.get(key)
            if plan is None or not plan.busy:
                break
            slot += 1
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        if kind == "direct":
            return self._keep(key, _TensorPlan(t, len(self.in_neighbors), self._w_self, self._w_in))
        return self._keep(key, _StagedPlan(self, t, max(1, self.stage_chunk // t.element_size())))

    def _keep(self, key, plan):
        self._plans[key] = plan
        while len(self._plans) > self._plan_cache:
            _, old = self._plans.popitem(last=False)
            if self._last is not None and self._last[3] is old:
                self._last = None
            _free_plan(old)
        return plan

    def _start(self, x, out, defer=False):
        self.overlap.flush()                 # a mix the progress thread has not started yet goes first
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
            return self._launch(plan, a, o, out, None, defer)
        if _direct(x, self.cuda_aware):
            return self._start_direct(x, out)
        if _staged(x):
            return self._start_staged(x, out)
        a, _ = _as_array(x, writable=False)
        if out is None:
            o, wb = np.empty_like(a), None
            if type(x).__module__.startswith("torch"):
                import torch
                result = torch.from_numpy(o).view(x.shape)
            else:
                result = o.reshape(np.shape(x))
        else:
            o, wb = _as_array(out, fill=False)   # written by the combine only: no copy in
            if o.size != a.size or o.dtype != a.dtype:
                raise ValueError("mix: out must match x in size and dtype")
            result = out
        plan = self._plan_for(a)
        if plan.busy:
            raise RuntimeError("a nonblocking mix of this buffer is still pending; wait() first")
        if out is not None and wb is None:  # zero-copy host buffers only
            torchy = type(x).__module__.startswith("torch") or type(out).__module__.startswith("torch")
            self._last = (x, out, _pointers(x, out) if torchy else None, plan, a, o)
        return self._launch(plan, a, o, result, wb, defer)

    def _start_staged(self, x, out):
        """A device tensor through the plan's pinned host buffer, chunk by chunk (:class:`_StagedPlan`)."""
        import torch
        t = x.detach()
        if not t.is_contiguous():
            raise ValueError("GraphComm needs a contiguous tensor (call .contiguous())")
        result = torch.empty_like(t) if out is None else out
        rdtype = result.dtype if torch.is_tensor(result) else torch.from_numpy(np.zeros(0, result.dtype)).dtype
        if int(np.prod(np.shape(result))) != t.numel() or rdtype != t.dtype:
            raise ValueError("mix: out must match x in size and dtype")
        flat = t.reshape(-1)
        plan = self._tensor_plan("staged", flat)
        if plan.event is not None:           # the last copy out of the buffer has finished
            plan.event.synchronize()
            plan.event = None
        cuda = flat.device.type == "cuda"
        events = []
        for a, b, _ in plan.chunks:          # every chunk's device -> host copy queued at once
            plan.host[a:b].copy_(flat[a:b], non_blocking=cuda)
            if cuda:
                events.append(torch.cuda.Event())
                events[-1].record()
        requests = []
        for i, (_, _, p) in enumerate(plan.chunks):
            if cuda:
                events[i].synchronize()      # chunk i is on the host: send it while i + 1 copies
            if p.request is not None:
                p.request.Start()
                requests.append(p.request)
            else:
                requests.append(self.graph.Ineighbor_allgather(p.send, p.recv))
        plan.busy = True
        self.bytes_sent += flat.numel() * flat.element_size() * len(self.out_neighbors)
        self.messages_sent += len(self.out_neighbors)
        return plan, None, None, result, None, _StagedMix(plan, requests, result)

    def _start_direct(self, x, out):
        import torch
        a = _device_buffer(x)
        if out is None:
            result = torch.empty_like(x)
            o = result.reshape(-1)
        else:
            if not type(out).__module__.startswith("torch") or out.device != x.device:
                raise ValueError("mix: with cuda_aware, out must be a tensor on x's device")
            o = out.detach().reshape(-1)
            result = out
        if o.numel() != a.numel() or o.dtype != a.dtype:
            raise ValueError("mix: out must match x in size and dtype")
        plan = self._tensor_plan("direct", a)
        return self._launch(plan, a, o, result, None)

    def _launch(self, plan, a, o, result, wb, defer=False):
        if plan.request is not None:
            request = plan.request           # progress "thread": the thread starts it (Overlap.defer)
            if not (defer and self.overlap.defer(request, request.Start)):
                request.Start()
                if defer:
                    self.overlap.watch(request)
        else:
            request = self.graph.Ineighbor_allgather(a if plan.send is None else plan.send, plan.recv)
        plan.busy = True
        self.bytes_sent += (a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()) \
            * len(self.out_neighbors)
        self.messages_sent += len(self.out_neighbors)
        return plan, a, o, result, wb, request

    def _combine(self, plan, a, o, writeback):
        if isinstance(plan, _StagedPlan):    # combined chunk by chunk in _StagedMix.Wait
            return
        if isinstance(plan, _TensorPlan):
            combine_torch(a, plan.recv, plan.w_self, plan.w, o)
            return
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
        plan, a, o, result, wb, request = self._start(x, out, defer=True)
        if plan.request is None:             # not persistent (or staged): started here, watch it
            self.overlap.watch(request)
        return _PendingResult(self, plan, a, o, wb, request, result)

    # -- overlap with backward (mpidl.comm.overlap) ----------------------
    def attach(self, fm):
        """Local. Hook this communicator's progress and gradient buckets onto ``fm`` (a
        :class:`~mpidl.flat.FlatModel`): see :mod:`mpidl.comm.overlap`.  Returns ``self``."""
        self.overlap.attach(fm)
        return self

    def gradient_mean(self, weight_decay: float = 0.0):
        """Local. A reducer with ``reduce(g, x)`` (Collective): ``g <- mean_i (g_i + wd x_i)`` in place.

        When the attached model's gradient is ``g`` and ``bucket_mb > 0`` (host buffers), the buckets
        are reduced during backward (:mod:`mpidl.comm.overlap`) and ``reduce`` finishes them;
        otherwise ``reduce`` adds ``wd x`` and makes one allreduce.  Make it once (at the algorithm's
        ``init``, before the first backward).
        """
        return self.overlap.gradient_mean(self, weight_decay)

    # -- point-to-neighbour payloads ------------------------------------
    def exchange(self, send: dict) -> dict:
        """Collective. Send ``send[j]`` to out-neighbour j; return ``{i: array}`` from in-neighbours.

        Payloads may differ in shape and dtype per neighbour; an out-neighbour
        missing from ``send`` gets nothing.  A key that is not an out-neighbour
        is an error on every rank.
        """
        MPI = _mpi()
        self.overlap.flush()                 # the graph communicator's collectives keep their order
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
        if _direct(x, self.cuda_aware) and (out is None or _direct(out, True)):
            return self._allreduce_direct(x, op, mop, out)
        a, _ = _as_array(x, writable=False)
        if out is None:
            o, wb, result = np.empty_like(a), None, None
        else:
            o, wb = _as_array(out, fill=False)   # out is x: the same mirror, filled above
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

    def _allreduce_direct(self, x, op, mop, out):
        MPI = _mpi()
        a = _device_buffer(x)
        if out is None:
            import torch
            result = torch.empty_like(x)
        else:
            result = out
        o = _device_buffer(result)
        if o.numel() != a.numel() or o.dtype != a.dtype:
            raise ValueError("allreduce: out must match x in size and dtype")
        if o.data_ptr() == a.data_ptr():
            self.base.Allreduce(MPI.IN_PLACE, o, op=mop)
        else:
            self.base.Allreduce(a, o, op=mop)
        if op == "mean":
            o /= self.size
        self._charge_allreduce(a.numel() * a.element_size())
        return result

    def start_allreduce(self, x: np.ndarray, op="sum"):
        """Collective. Begin an elementwise reduction of the NumPy array ``x``; ``.wait()`` returns it.

        A nonblocking ``Iallreduce`` into a new array (``x`` must stay untouched
        until ``wait()``); ``mean`` is not offered.  Every rank must start its
        reductions in the same order.
        """
        MPI = _mpi()
        if op not in ("sum", "max", "min"):
            raise ValueError(f"start_allreduce: op must be sum, max or min, got {op!r}")
        a = np.ascontiguousarray(x)
        o = np.empty_like(a)
        req = self.base.Iallreduce(a, o, op={"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op])
        self._charge_allreduce(a.nbytes)
        self.overlap.watch(req)
        return _Reduction(req, a, o, self.overlap)

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
        if _direct(obj, self.cuda_aware):
            a = _device_buffer(obj)
            self.base.Bcast(a, root=root)
            if self.rank == root:
                self.bytes_sent += a.numel() * a.element_size() * (self.size - 1)
            return obj
        if isinstance(obj, np.ndarray) or type(obj).__module__.startswith("torch"):
            a, wb = _as_array(obj, fill=self.rank == root)
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

    # ---- pdADMM (issue 11): nonblocking point-to-neighbour messages -- begin ----
    def start_exchange(self, send: dict, recv: dict, tag: int = 0) -> "Exchange":
        """Local (a collective pattern). Start sends ``send[j]`` to out-neighbours and receives
        into the preallocated ``recv[i]`` from in-neighbours; ``.wait()`` completes both.

        Point-to-point on the graph communicator (ranks are unchanged: reorder=False),
        zero-copy: arrays must be C-contiguous, ``recv`` buffers writable, and each
        pair of ranks must agree on the sizes (the caller's protocol fixes them).
        Neither ``send`` nor ``recv`` arrays may be touched until ``wait()``
        returns.  Counts bytes and messages like :meth:`exchange`.  Messages
        between two ranks with the same tag arrive in the order they were started.
        """
        MPI = _mpi()
        self.overlap.flush()
        bad = [j for j in send if j not in self.out_neighbors] + \
              [i for i in recv if i not in self.in_neighbors]
        if bad:
            raise ValueError(f"rank {self.rank}: start_exchange() with ranks {bad} that are not "
                             f"neighbours in topology {self.topology.name!r}")
        reqs = []
        for i, buf in recv.items():
            a, _ = _as_array(buf)
            reqs.append(self.graph.Irecv([a.view(np.uint8), MPI.BYTE], source=i, tag=tag))
        for j, arr in send.items():
            a, _ = _as_array(arr, writable=False)
            if not a.flags.c_contiguous:
                raise ValueError("start_exchange needs C-contiguous send arrays")
            reqs.append(self.graph.Isend([a.view(np.uint8), MPI.BYTE], dest=j, tag=tag))
            self.bytes_sent += int(a.nbytes)
            self.messages_sent += 1
        return Exchange(reqs)
    # ---- pdADMM (issue 11): nonblocking point-to-neighbour messages -- end ----


# ---- pdADMM (issue 11): handle of start_exchange -- begin ----
class Exchange:
    """Handle of :meth:`GraphComm.start_exchange`: ``wait()`` completes every send and receive."""

    def __init__(self, requests):
        self._requests = requests

    def wait(self):
        """Local. Block until all messages of this exchange have completed."""
        if self._requests:
            _mpi().Request.Waitall(self._requests)
            self._requests = []

    def test(self) -> bool:
        """Local. True when every message has completed (then wait() returns at once)."""
        if not self._requests:
            return True
        done = _mpi().Request.Testall(self._requests)
        if done:
            self._requests = []
        return bool(done)
# ---- pdADMM (issue 11): handle of start_exchange -- end ----


class _Reduction:
    """Handle of :meth:`GraphComm.start_allreduce`: ``test()``, ``wait() -> array``."""

    def __init__(self, request, send, out, overlap):
        self._request, self._send, self._out, self._overlap = request, send, out, overlap

    def test(self) -> bool:
        """Local. True when the reduction has finished."""
        return self._request is None or self._overlap.test(self._request)

    def wait(self) -> np.ndarray:
        """Local. Finish the reduction and return the reduced array."""
        if self._request is not None:
            self._overlap.unwatch(self._request)
            self._request.Wait()
            self._request = self._send = None
        return self._out


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

    def __init__(self, comm, schedule, *, cache=8, cuda_aware=False, overlap=None):
        self.comm = comm
        self.cuda_aware = bool(cuda_aware)
        self.overlap = overlap          # shared with the base communicator's model (None: each its own)
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
            gc = GraphComm(self.comm, topo, cuda_aware=self.cuda_aware, overlap=self.overlap)
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
