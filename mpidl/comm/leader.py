"""Leader SGD / EASGD communicators (issue 9; see :mod:`mpidl.comm` and :mod:`mpidl.algorithms.lsgd`).

A world/group pair of communicators with leader election (MINLOC), leader
broadcast, the EASGD sum, a nonblocking barrier for asynchronous rounds, and
:class:`ModelWindow`, a one-sided (RMA) slot holding one model.
"""
from __future__ import annotations

import time

import numpy as np

from mpidl.comm.core import _as_array, _device_buffer, _direct, _mpi
from mpidl.errors import MpidlError
from mpidl.xp import is_tensor


def _np_dtype(dtype) -> np.dtype:
    """A NumPy dtype from a NumPy dtype (or anything ``np.dtype`` takes) or a torch dtype."""
    if type(dtype).__module__.startswith("torch"):
        import torch
        return torch.empty(0, dtype=dtype).numpy().dtype
    return np.dtype(dtype)


class LeaderComm:
    """Collective. World and group communicators of the leader-based methods.

    ``LeaderComm(gc, groups, group_size)`` duplicates ``gc.base`` (all ranks)
    and splits it into groups: ``groups="all"`` one group of every rank,
    ``"size"`` consecutive blocks of ``group_size`` ranks (must divide the
    world size), ``"node"`` one group per shared-memory node
    (``Split_type(COMM_TYPE_SHARED)``).  Bytes handed to MPI are charged to
    ``gc.bytes_sent`` / ``gc.messages_sent`` so the driver's counters include them.

    :meth:`bcast` and :meth:`allreduce_sum` take NumPy arrays and torch tensors:
    a device tensor is staged through its pinned host mirror
    (:func:`mpidl.comm.core._as_array`), or handed to MPI as it is when
    ``gc.cuda_aware`` (a CUDA-aware MPI).
    """

    def __init__(self, gc, groups="all", group_size=0):
        MPI = _mpi()
        self.gc = gc
        self.cuda_aware = bool(getattr(gc, "cuda_aware", False))
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
            from mpidl.comm.core import node_info
            color = node_info(self.world).leader   # one group per node, named by its lowest rank
        else:
            self.world.Free()
            raise MpidlError(f"groups must be all, size or node, got {groups!r}")
        self.group = self.world.Split(color, key=self.rank)
        self.group_id = color
        self.grank, self.gsize = self.group.Get_rank(), self.group.Get_size()
        self.group_ranks = self.group.allgather(self.rank)   # group rank -> world rank
        self.n_groups = self.world.allreduce(1 if self.grank == 0 else 0, op=MPI.SUM)
        self._windows = []
        self._token = np.zeros(0, np.uint8)
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
        """Collective over ``scope``. Broadcast array or tensor ``x`` in place from ``root`` (rank in scope)."""
        c = self._scope(scope)
        is_root = c.Get_rank() == root
        if _direct(x, self.cuda_aware):
            a = _device_buffer(x)
            c.Bcast(a, root=root)
            nbytes = a.numel() * a.element_size()
        else:
            a, wb = _as_array(x, fill=is_root)    # only the root's values travel: no copy in elsewhere
            c.Bcast(a, root=root)
            if wb is not None:
                wb()
            nbytes = a.nbytes
        if is_root and c.Get_size() > 1:
            self.charge(nbytes * (c.Get_size() - 1), c.Get_size() - 1)
        return x

    def allreduce_sum(self, x, out):
        """Collective over the world. ``out = sum_i x_i`` (ring-model bytes charged; ``out`` may be ``x``)."""
        MPI = _mpi()
        if _direct(x, self.cuda_aware) and _direct(out, True):
            a, o = _device_buffer(x), _device_buffer(out)
            if o.numel() != a.numel() or o.dtype != a.dtype:
                raise ValueError("allreduce_sum: out must match x in size and dtype")
            if o.data_ptr() == a.data_ptr():
                self.world.Allreduce(MPI.IN_PLACE, o, op=MPI.SUM)
            else:
                self.world.Allreduce(a, o, op=MPI.SUM)
            nbytes = a.numel() * a.element_size()
        else:
            a, _ = _as_array(x, writable=False)
            o, wb = _as_array(out, fill=False)    # written by MPI only (out is x: the mirror filled above)
            if o.size != a.size or o.dtype != a.dtype:
                raise ValueError("allreduce_sum: out must match x in size and dtype")
            if np.shares_memory(a, o):
                self.world.Allreduce(MPI.IN_PLACE, o, op=MPI.SUM)
            else:
                self.world.Allreduce(a, o, op=MPI.SUM)
            if wb is not None:
                wb()
            nbytes = a.nbytes
        if self.size > 1:
            self.charge(2 * (self.size - 1) * nbytes // self.size, 2 * (self.size - 1))
        return out

    def barrier(self):
        """Collective over the world. Block until every rank arrives."""
        self.world.Barrier()

    def in_turn(self, fn):
        """Collective over the world. Call ``fn()`` on rank 0, then on rank 1, ... (one at a time).

        A zero-byte token passes from rank r to rank r + 1; a barrier at the
        end keeps consecutive calls apart (rank 0's next turn starts after the
        last rank's turn).  The serialised schedule of ``deterministic = true``.
        Returns this rank's ``fn()``.  The tokens are not charged (no payload).
        """
        tag = 0x7E57
        if self.rank > 0:
            self.world.Recv([self._token, _mpi().BYTE], source=self.rank - 1, tag=tag)
        out = fn()
        if self.rank < self.size - 1:
            self.world.Send([self._token, _mpi().BYTE], dest=self.rank + 1, tag=tag)
        self.world.Barrier()
        return out

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


def window_hint(MPI, err) -> str:
    """Local. The error for a failed ``MPI_Win_allocate``, with the known cause and cure."""
    msg = f"MPI could not create the RMA window of LSGD/EASGD ({err})"
    if "Open MPI" in MPI.Get_library_version():
        msg += ("; Open MPI 4.1 without an RDMA network (TCP between nodes) has only the pt2pt one-sided "
                "component, which refuses MPI_THREAD_MULTIPLE (mpi4py's default thread level): export "
                "MPI4PY_RC_THREAD_LEVEL=serialized OMPI_MCA_osc=sm,pt2pt before mpirun (docs/clusters.md, "
                "\"Open MPI over TCP\")")
    return msg


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

    The model arguments (``out``, ``x``, ``buf``, ``init``) may be NumPy arrays or
    torch tensors; RMA only ever sees host memory: a device tensor (or any tensor
    under :data:`mpidl.comm.core.STAGE_CPU_TENSORS`) is copied through its host
    mirror (:func:`mpidl.comm.core._as_array`), a CPU tensor is used through its
    NumPy view.  ``dtype`` may be a NumPy or a torch dtype.
    """

    HDR = 32
    OFF = 24

    def __init__(self, comm, count, dtype, lc, init=None):
        MPI = _mpi()
        self.comm, self.lc = comm, lc
        self.dtype = _np_dtype(dtype)
        self.count = int(count)
        self.nbytes = self.count * self.dtype.itemsize
        self.slot = self.HDR + self.nbytes
        self.is_host = comm.Get_rank() == 0
        size = self.OFF + 2 * self.slot if self.is_host else 0
        try:
            self.win = MPI.Win.Allocate(size, 1, comm=comm)
        except MPI.Exception as e:
            raise MpidlError(window_hint(MPI, e)) from None
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
            self._write(0, (0.0, 0.0, 0.0), self._host_in(init), charge=False)  # set-up, not traffic
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

    def _write(self, s, meta, x, charge=True):
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
        if charge:
            self.lc.charge(self.slot + 8, 2)

    def _check(self, out):
        if is_tensor(out):
            try:
                dt = _np_dtype(out.dtype)
            except TypeError:       # a torch dtype NumPy lacks (bfloat16): never the window's
                dt = None
            n, contiguous = out.numel(), out.is_contiguous()
        else:
            dt, n, contiguous = out.dtype, out.size, out.flags.c_contiguous
        if dt != self.dtype or n != self.count or not contiguous:
            raise ValueError(f"ModelWindow holds {self.count} {self.dtype} values; got {out.dtype} x {n}")

    def _host_in(self, x):
        """Flat C-contiguous host array of the window's dtype holding ``x`` (zero-copy where it can)."""
        a = _as_array(x, writable=False)[0] if is_tensor(x) else np.asarray(x)
        return np.ascontiguousarray(a.reshape(-1), self.dtype)

    # public operations -------------------------------------------------
    def read(self, out, charge=True, retries=100000):
        """Local (no lock; versioned double buffer). Copy the newest model into ``out``.

        Returns its header ``(seq, loss, owner, step)``, or None while the slot is empty.
        """
        self._check(out)
        host, wb = _as_array(out, fill=False)     # RMA writes host memory (a tensor's mirror or view)
        for _ in range(retries):
            s1 = self._atomic(8)
            if s1 == 0:
                return None
            self._get_slot(s1, host)
            s2 = self._atomic(16)
            if charge:
                self.lc.charge(self.slot + 16, 3)
            if s2 <= s1 + 1 and int(self._hdr[0]) == s1:
                if wb is not None:
                    wb()
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
                self._write(s, (loss, owner, step), self._host_in(x))
                return True, (float(s + 1), float(loss), float(owner), float(step))
            host, wb = _as_array(out, fill=False)
            self._get_slot(s, host)
            if wb is not None:
                wb()
            self.lc.charge(self.HDR + 16, 3)
            return False, tuple(float(v) for v in self._hdr)
        finally:
            self._unlock()

    def snapshot(self, out):
        """Local (no lock). The published model into ``out`` and its header as a float64 array.

        ``[seq, loss, owner, step]``, all zero while the window is empty (then
        ``out`` is left as it was).  Not charged to the byte counters: a
        checkpoint's copy, not training traffic.  Call it when no worker writes
        (after a barrier) to get a consistent copy.
        """
        hdr = self.read(out, charge=False)
        return np.zeros(4) if hdr is None else np.array(hdr, dtype=np.float64)

    def restore(self, header, x):
        """Local (mutex). Make the window hold what :meth:`snapshot` returned: version, header, model.

        ``header[0]`` (the version ``seq``) = 0 empties the window; otherwise
        the model ``x`` is published as version ``seq`` with the saved loss,
        owner and step, so the versions of a resumed run continue the
        checkpointed ones.  Call it before any other rank uses the window (a
        barrier after); not counted in ``writes`` nor charged.
        """
        MPI = _mpi()
        header = np.asarray(header, dtype=np.float64)
        if header.shape != (4,):
            raise ValueError(f"a ModelWindow header is [seq, loss, owner, step]; got shape {header.shape}")
        seq = int(header[0])
        if seq < 0 or seq != header[0]:
            raise ValueError(f"a ModelWindow version must be a whole number >= 0; got {header[0]}")
        if seq:
            x = self._host_in(x)
            if x.size != self.count:
                raise ValueError(f"ModelWindow holds {self.count} {self.dtype} values; got {x.size}")
        self._lock()
        try:
            self._atomic(16, seq)
            if seq:
                off = self.OFF + (seq % 2) * self.slot
                h = np.ascontiguousarray(header)
                self.win.Put([h.view(np.uint8), MPI.BYTE], 0, (off, self.HDR, MPI.BYTE))
                self.win.Put([x.view(np.uint8), MPI.BYTE], 0, (off + self.HDR, self.nbytes, MPI.BYTE))
                self.win.Flush(0)
            self._atomic(8, seq)
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
        host, wb = _as_array(buf, fill=False)     # host memory for RMA (a tensor's mirror or view)
        self._lock()
        try:
            s = self._atomic(8)
            if s:
                self._get_slot(s, host)
                meta = tuple(float(v) for v in self._hdr[1:])
            else:
                host[...] = 0
                meta = (0.0, 0.0, 0.0)
            if wb is not None:                    # staged: buf <- the mirror, fn, the mirror <- buf
                wb()
                fn(buf)
                host, _ = _as_array(buf, writable=False)
            else:
                fn(buf)
            self._write(s, meta, host)
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
