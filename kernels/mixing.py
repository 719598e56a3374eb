"""Local combine step of one graph-consensus mix.

After the neighbour collective has gathered the in-neighbours' vectors into
``recv`` (one row per in-neighbour, in the order of the topology's
in-neighbour list), agent i computes

    out = w_self * x + sum_j w[j] * recv[j]          (ALGORITHMS.md section 0)

accumulated left to right in x's dtype.  The NumPy twin is
``tests/reference/kernels.py::combine``.

Performance notes (the combine sits on the critical path of every mix):

* The inner loops run over contiguous elements so LLVM vectorises them.  With
  one or two in-neighbours (ring, 2-ring, exponential(4)) the whole combine is
  ONE fused pass over memory; with more, the vector is cut into blocks of
  ``BLOCK`` elements and the extra rows are added while the block of ``out``
  is still in L1 cache.
* ``out`` may alias ``x`` (in-place mix).  That case has its own loops that
  name the buffer once: two views of one buffer defeat LLVM's runtime alias
  check and would silently fall back to scalar code (3-5x slower).  Element p
  of ``out`` is written only after element p of ``x`` has been read.  Partial
  overlap of ``out`` and ``x`` (shifted views) is not supported.
"""
import numba
import numpy as np

from ._flags import JIT

BLOCK = 2048
"""Elements per cache block when there are more than two in-neighbours."""


@numba.njit(**JIT)
def _head(x, r0, r1, k, w_self, w0, w1, out):
    """out = w_self x + w0 r0 (+ w1 r1) for the first min(k, 2) rows; out and x distinct."""
    m = x.shape[0]
    if k == 0:
        for p in range(m):
            out[p] = w_self * x[p]
    elif k == 1:
        for p in range(m):
            out[p] = w_self * x[p] + w0 * r0[p]
    else:
        for p in range(m):
            out[p] = w_self * x[p] + w0 * r0[p] + w1 * r1[p]


@numba.njit(**JIT)
def _head_inplace(x, r0, r1, k, w_self, w0, w1):
    """x = w_self x + w0 r0 (+ w1 r1), naming x once so the loop vectorises."""
    m = x.shape[0]
    if k == 0:
        for p in range(m):
            x[p] = w_self * x[p]
    elif k == 1:
        for p in range(m):
            x[p] = w_self * x[p] + w0 * r0[p]
    else:
        for p in range(m):
            x[p] = w_self * x[p] + w0 * r0[p] + w1 * r1[p]


@numba.njit(**JIT)
def _tail(recv, w, s, e, out):
    """out += w[j] recv[j, s:e] for rows j >= 2 (out is the block s:e)."""
    for j in range(2, recv.shape[0]):
        wj = w[j]
        rj = recv[j, s:e]
        for p in range(e - s):
            out[p] += wj * rj[p]


@numba.njit(**JIT)
def _combine(x, recv, w_self, w, out):
    n = x.shape[0]
    k = recv.shape[0]
    inplace = out.ctypes.data == x.ctypes.data
    r0 = recv[0] if k > 0 else x
    r1 = recv[1] if k > 1 else x
    w0 = w[0] if k > 0 else w_self
    w1 = w[1] if k > 1 else w_self
    step = n if k <= 2 else BLOCK
    for s in range(0, n, max(step, 1)):
        e = min(s + step, n)
        if inplace:
            _head_inplace(out[s:e], r0[s:e], r1[s:e], k, w_self, w0, w1)
        else:
            _head(x[s:e], r0[s:e], r1[s:e], k, w_self, w0, w1, out[s:e])
        if k > 2:
            _tail(recv, w, s, e, out[s:e])
    return out


def combine_prepared(x, recv, w_self, w, out):
    """Local. :func:`combine` without input checks, for callers that validated once.

    ``x`` and ``out`` 1-D C-contiguous (equal or non-overlapping), ``recv``
    (k, P) C-contiguous, ``w`` a length-k array and ``w_self`` a scalar, all
    of x's dtype.  :class:`mpidl.comm.GraphComm` prepares these per plan.
    """
    return _combine(x, recv, w_self, w, out)


def combine(x, recv, w_self, w, out=None):
    """Local. ``out = w_self * x + w @ recv`` for 1-D ``x`` and 2-D ``recv``.

    ``x``, ``recv`` and ``out`` share one float dtype (float32 or float64); the
    weights are cast to it, so a float32 mix stays in float32 arithmetic.
    ``out`` may be ``x`` itself (in place) or a non-overlapping array.
    """
    x = np.asarray(x)
    recv = np.asarray(recv)
    if x.ndim != 1 or recv.ndim != 2 or recv.shape[1] != x.shape[0]:
        raise ValueError(
            f"combine: expected x of shape (P,) and recv of shape (k, P), "
            f"got {x.shape} and {recv.shape}")
    if x.dtype not in (np.float32, np.float64) or recv.dtype != x.dtype:
        raise TypeError(
            f"combine: x and recv must share dtype float32 or float64, "
            f"got {x.dtype} and {recv.dtype}")
    w = np.ascontiguousarray(w, dtype=x.dtype)
    if w.shape != (recv.shape[0],):
        raise ValueError(f"combine: {recv.shape[0]} rows but {w.shape} weights")
    if out is None:
        out = np.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError("combine: out must match x in shape and dtype")
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        x, out_c = np.ascontiguousarray(x), np.ascontiguousarray(out)
        _combine(x, np.ascontiguousarray(recv), x.dtype.type(w_self), w, out_c)
        if out_c is not out:
            out[...] = out_c
        return out
    if (out.ctypes.data != x.ctypes.data) and np.shares_memory(out, x):
        raise ValueError("combine: out must be x itself or not overlap x")
    return _combine(x, np.ascontiguousarray(recv), x.dtype.type(w_self), w, out)
