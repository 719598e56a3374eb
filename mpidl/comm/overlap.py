"""Overlap of communication with backward: progress of pending requests, gradient buckets.

The comm layer alone owns progress and overlap (DESIGN.md): an algorithm says "start this mix"
(:meth:`GraphComm.start_mix`) or "this is the model's gradient, average it"
(:meth:`GraphComm.gradient_mean`) and "I need it now" (``wait()`` / ``reduce()``); whether the bytes
move while backward runs is decided here, by two ``[comm]`` keys, and never changes a result.

**Progress** (``[comm] progress``).  MPICH and Open MPI advance a nonblocking collective only
inside MPI calls of the process that started it, so a mix started before the gradient may not
move at all while backward computes.  :class:`Overlap` keeps the list of this rank's pending
requests (a :class:`~mpidl.comm.graph.Pending` mix, a nonblocking allreduce, a gradient bucket)
and pokes them:

* ``"none"``: nothing (the MPI's own progress only);
* ``"hooks"``: one ``MPI_Test`` of every pending request from torch hooks: after each leaf
  module's forward (``register_forward_hook``) and after each parameter's gradient is accumulated
  (``register_post_accumulate_grad_hook``), i.e. (leaf modules + parameter tensors) times per step;
* ``"thread"``: a Python thread tests every pending request every ``poll_us`` microseconds
  (default 500), or with ``poll_us = 0`` waits (``MPI_Wait``, the GIL released) on the oldest
  one, so that the MPI library progresses all of them continuously (and spins a core: measured
  slower on a loaded machine, docs/benchmarks.md); it sleeps on a condition when nothing is
  pending.  ``wait()`` in the main thread returns once the thread is done with the request.
  The thread also *starts* a mix's persistent
  request (:meth:`defer`): over TCP an MPI may push the first part of a large message inside
  ``MPI_Start``, which would otherwise block the main thread before its gradient.  Starts stay
  in the order the main thread asked for them (the thread starts them under the lock, and any
  other operation on the same communicator starts what is queued first, :meth:`flush`).
  Needs ``MPI_THREAD_MULTIPLE`` (:func:`mpidl.comm.init_world` asks for it); a lower level is
  an error.

Testing a request changes when its bytes move, never what they are: the combine and the update
run after ``wait()`` exactly as before, so every mode gives the same bits
(tests/mpi/mpitest_overlap.py).

**Buckets** (``[comm] bucket_mb``).  :meth:`GraphComm.gradient_mean` of an attached model's
gradient averages it in buckets as backward produces them, as torch DDP does: the parameters,
in reverse order (backward meets the last layers first), are cut into buckets of about
``bucket_mb`` MiB; a bucket whose every gradient has been accumulated gets this rank's weight
decay term added (``g += wd x`` on its slice, the same elementwise operation as on the whole
vector) and a nonblocking ``MPI_Iallreduce`` (sum, in place).  Buckets start strictly in bucket
order (a complete bucket waits for the ones before it), so every rank starts the same
collectives in the same order whatever order its hooks fire in.  ``reduce()`` starts what is
left (parameters that got no gradient), waits for all, and divides by the number of ranks.
``bucket_mb = 0`` keeps one blocking allreduce of the whole gradient after backward.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from mpidl.comm.core import _as_array, _mpi, _staged
from mpidl.errors import MpidlError

PROGRESS_MODES = ("none", "hooks", "thread")
DEFAULT_BUCKET_MB = 1.0
"""Default ``[comm] bucket_mb`` (see docs/benchmarks.md, bench_ddp)."""


class Overlap:
    """Local. The progress engine and gradient buckets of one model on one rank.

    ``Overlap(progress="none", bucket_mb=DEFAULT_BUCKET_MB, poll_us=500)``; :meth:`attach` puts
    the hooks on a :class:`~mpidl.flat.FlatModel`.  Shared by every :class:`GraphComm` that serves
    the model (a time-varying schedule's communicators share their base's).
    """

    def __init__(self, progress: str = "none", bucket_mb: float = DEFAULT_BUCKET_MB, poll_us: float = 500.0):
        if progress not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {progress!r}")
        if not bucket_mb >= 0:
            raise ValueError(f"bucket_mb must be >= 0, got {bucket_mb!r}")
        self.progress = progress
        self.bucket_bytes = int(float(bucket_mb) * (1 << 20))
        self.poll_s = max(0.0, float(poll_us)) * 1e-6
        self.fm = None
        self.tests = 0                  # MPI_Test calls of the hooks, requests waited on by the thread
        self._watched = []
        self._handles = []
        self._reducer = None            # the armed _Buckets (one gradient_mean per model)
        self._cond = threading.Condition()
        self._busy = None               # the request the thread is waiting on
        self._unstarted = {}            # id(request) -> its Start, for requests the thread starts
        self._thread = None
        self._stop = False

    # -- the model -------------------------------------------------------
    def attach(self, fm):
        """Local. Put a post-accumulate-grad hook on every parameter of ``fm`` (a FlatModel).

        Raises :class:`~mpidl.errors.MpidlError` when ``progress = "thread"`` and MPI was not initialised with
        ``MPI_THREAD_MULTIPLE`` (every rank runs the same MPI, so every rank raises).
        """
        if self.fm is not None:
            raise RuntimeError("this Overlap is already attached to a model")
        if self.progress == "thread":
            _need_thread_level("multiple", 'progress = "thread"', 'use progress = "hooks"')
        elif self.progress == "hooks" and fm.device is not None:   # device autograd runs hooks off the main thread
            _need_thread_level("serialized", 'progress = "hooks" on a device model', 'use progress = "none"')
        self.fm = fm
        if self.progress == "none" and self.bucket_bytes == 0:
            return self                 # nothing to do in backward: no hooks at all
        for i, p in enumerate(fm.params_list):
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))
        if self.progress == "hooks":    # the mix starts before the forward: test it there as well
            for mod in fm.model.modules():
                if next(mod.children(), None) is None:
                    self._handles.append(mod.register_forward_hook(self._forward_hook))
        return self

    def _forward_hook(self, module, inputs, output):
        if self._watched:
            self.poke()

    def _hook(self, i):
        def hook(p):
            red = self._reducer
            if red is not None:
                red.ready(i, p)
            if self.progress == "hooks" and self._watched:
                self.poke()
        return hook

    def close(self):
        """Local. Remove the hooks and stop the thread (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._thread is not None:
            with self._cond:
                self._stop = True
                busy = self._busy is not None
                self._cond.notify_all()
            if not busy:                # a request never completed (an error elsewhere): leave the daemon
                self._thread.join()
            self._thread = None

    # -- pending requests -----------------------------------------------
    def watch(self, request):
        """Local. Test ``request`` (anything with ``Test()``) during backward until :meth:`unwatch`."""
        if self.progress == "none":
            return
        with self._cond:
            self._watched.append(request)
            if self.progress == "thread":
                if self._thread is None:
                    if self.fm is None:     # never attached (a convex model): the check attach makes
                        _need_thread_level("multiple", 'progress = "thread"', 'use progress = "hooks"')
                    self._thread = threading.Thread(target=self._run, name="mpidl-progress", daemon=True)
                    self._thread.start()
                self._cond.notify_all()

    def defer(self, request, start) -> bool:
        """Local. In thread mode, queue ``request`` (not started) with ``start`` (its ``Start``) for
        the thread to start and progress; returns False (nothing done) in the other modes."""
        if self.progress != "thread":
            return False
        with self._cond:
            self._unstarted[id(request)] = start
        self.watch(request)
        return True

    def flush(self, upto=None):
        """Local. Start every queued request (in order), or those up to ``upto``.  Call it before
        another operation on a communicator a queued request belongs to."""
        if not self._unstarted:
            return
        with self._cond:
            self._flush(upto)

    def _flush(self, upto=None):
        for r in list(self._watched):
            start = self._unstarted.pop(id(r), None)
            if start is not None:
                start()
            if r is upto:
                return

    def unwatch(self, request):
        """Local. Stop progressing ``request``; on return no other thread touches it (wait on it then).

        When the progress thread is inside ``request.Wait()``, this returns once it has completed;
        a queued request is started first.
        """
        if self.progress == "none":
            return
        with self._cond:
            while self._busy is request:
                self._cond.wait()
            if id(request) in self._unstarted:
                self._flush(request)
            try:
                self._watched.remove(request)
            except ValueError:
                pass

    def test(self, request) -> bool:
        """Local. ``request.Test()``, never at the same time as the progress thread's."""
        if self.progress != "thread":
            return bool(request.Test())
        with self._cond:
            if self._busy is request or id(request) in self._unstarted:
                return False
            return bool(request.Test())

    def poke(self):
        """Local. One ``Test`` of every watched (started) request (the hooks' progress call)."""
        for r in self._watched:
            if id(r) not in self._unstarted:
                r.Test()
                self.tests += 1

    def _run(self):
        """The progress thread.  ``poll_us > 0``: start what is queued and test every watched
        request, under the lock, every ``poll_us`` microseconds.  ``poll_us = 0``: ``Wait()`` on
        the oldest watched MPI request outside any lock (the MPI library then progresses every
        pending request while it waits, and the GIL is free); requests that are not MPI requests
        (a staged device mix) are tested every 50 microseconds."""
        MPI = _mpi()
        cond = self._cond
        while True:
            with cond:
                while not self._watched and not self._stop:
                    cond.wait()
                if self._stop:
                    return
                r = self._watched[0]
                mpi_request = isinstance(r, MPI.Request) and not self.poll_s
                if self.poll_s:
                    self._flush()
                    self.poke()
                elif mpi_request:
                    self._busy = r
                    start = self._unstarted.pop(id(r), None)
                    if start is not None:
                        start()         # under the lock: starts keep the main thread's order
                else:
                    self.poke()
            if not mpi_request:
                time.sleep(self.poll_s or 50e-6)
                continue
            try:
                r.Wait()
            finally:
                with cond:
                    self._busy = None
                    self.tests += 1
                    try:
                        self._watched.remove(r)
                    except ValueError:
                        pass
                    cond.notify_all()

    # -- gradient buckets -------------------------------------------------
    def gradient_mean(self, gc, weight_decay: float = 0.0):
        """Local. The reducer of the attached model's gradient (see :meth:`GraphComm.gradient_mean`)."""
        fm = self.fm
        if (fm is None or self.bucket_bytes == 0 or _staged(fm.g)
                or (gc.cuda_aware and type(fm.g).__module__.startswith("torch"))):
            return _Whole(gc, weight_decay)
        if self._reducer is not None:
            raise RuntimeError("the model's gradient already has a reducer (one gradient_mean per model)")
        self._reducer = _Buckets(self, gc, fm, self.bucket_bytes, weight_decay)
        return self._reducer


def _need_thread_level(name, what, instead):
    """Local. Raise :class:`MpidlError` unless MPI runs at thread level ``name`` or above (every rank
    runs the same MPI, initialised alike, so every rank raises together)."""
    MPI = _mpi()
    levels = {"single": MPI.THREAD_SINGLE, "funneled": MPI.THREAD_FUNNELED,
              "serialized": MPI.THREAD_SERIALIZED, "multiple": MPI.THREAD_MULTIPLE}
    level = MPI.Query_thread()
    if level < levels[name]:
        have = next((k for k, v in levels.items() if v == level), level)
        raise MpidlError(f"[comm] {what} needs MPI_THREAD_{name.upper()}; MPI was initialised with thread level "
                         f"{have!r} (mpi4py.rc.thread_level); {instead}")


class _Whole:
    """``reduce(g, x)``: ``g += wd x``, then one blocking allreduce (the path without buckets)."""

    buckets = 1

    def __init__(self, gc, weight_decay):
        self.gc, self.wd = gc, float(weight_decay)

    def reduce(self, g, x):
        """Collective. ``g <- mean_i (g_i + wd x_i)`` in place; returns ``g``."""
        if self.wd:
            g += self.wd * x
        self.gc.allreduce(g, op="mean", out=g)
        return g


def bucket_ranges(sizes, bucket_bytes, itemsize):
    """Local. Buckets of the flat buffer, DDP's order: ``(param -> bucket, [(a, b) per bucket])``.

    Parameters in reverse order fill a bucket until it holds at least ``bucket_bytes``; bucket 0
    holds the last parameters, so each bucket is one contiguous slice ``[a, b)`` of the buffer.
    """
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    of_param, ranges = [0] * len(sizes), []
    hi, filled = int(offsets[-1]), 0
    for i in reversed(range(len(sizes))):
        of_param[i] = len(ranges)
        filled += int(sizes[i]) * itemsize
        if filled >= bucket_bytes or i == 0:
            ranges.append((int(offsets[i]), hi))
            hi, filled = int(offsets[i]), 0
    return of_param, ranges


class _Buckets:
    """The armed gradient buckets of one model (see the module's docstring)."""

    def __init__(self, ov, gc, fm, bucket_bytes, weight_decay):
        self.ov, self.gc, self.fm, self.wd = ov, gc, fm, float(weight_decay)
        itemsize = fm.grads.element_size()
        self.of_param, self.ranges = bucket_ranges(fm.sizes, bucket_bytes, itemsize)
        self.buckets = len(self.ranges)
        self.need = [0] * self.buckets
        for b in self.of_param:
            self.need[b] += 1
        self._arm()

    def _arm(self):
        self.left = list(self.need)
        self.seen = [False] * len(self.of_param)
        self.requests = []
        self.started = 0
        self.twice = False

    def ready(self, i, p):
        """Local (starts collectives, in bucket order). Parameter ``i``'s gradient is accumulated."""
        if self.seen[i]:
            self.twice = True           # a second backward before reduce(): reported there
            return
        fm = self.fm
        a, b = int(fm.offsets[i]), int(fm.offsets[i + 1])
        if p.grad is not None and p.grad.data_ptr() != fm.grads.data_ptr() + a * fm.grads.element_size():
            fm.grads[a:b].copy_(p.grad.reshape(-1))      # autograd made a new tensor (grads set to None)
            p.grad = fm.grads[a:b].view(fm.shapes[i])
        self.seen[i] = True
        bucket = self.of_param[i]
        self.left[bucket] -= 1
        while self.started < self.buckets and self.left[self.started] == 0:
            self._start(self.started)

    def _start(self, bucket):
        MPI = _mpi()
        a, b = self.ranges[bucket]
        g, x = self.fm.g, self.fm.x
        if self.wd:
            gs = g[a:b]
            gs += self.wd * x[a:b]
        arr, _ = _as_array(g[a:b])
        req = self.gc.base.Iallreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        self.gc._charge_allreduce(arr.nbytes)
        self.requests.append(req)
        self.ov.watch(req)
        self.started += 1

    def reduce(self, g, x):
        """Collective. Start the buckets backward left, wait for all, ``g /= N``; returns ``g``.

        ``g`` must be the attached model's gradient buffer, produced by one backward since the last
        call; ``x`` is the parameter vector (the model's own buffer holds the same values).
        """
        fm = self.fm
        if g is not fm.g:
            raise RuntimeError("gradient_mean: reduce() needs the attached model's gradient buffer")
        while self.started < self.buckets:
            self._start(self.started)
        for r in self.requests:
            self.ov.unwatch(r)
        _mpi().Request.Waitall(self.requests)
        twice = self.twice
        self._arm()
        if twice:
            raise RuntimeError("gradient_mean with buckets: two backward passes before one step (gradient "
                               "accumulation); set [comm] bucket_mb = 0 for that loop")
        arr, _ = _as_array(g)
        arr /= self.gc.size             # as GraphComm.allreduce divides (NumPy, on the host view)
        return g
