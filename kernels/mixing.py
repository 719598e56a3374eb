"""Local combine step of one graph-consensus mix.

After the neighbour collective has gathered the in-neighbours' vectors into
``recv`` (one row per in-neighbour, in the order of the topology's
in-neighbour list), agent i computes

    out = w_self * x + sum_j w[j] * recv[j]          (ALGORITHMS.md section 0)

in one pass over memory.  ``out`` may alias ``x`` (in-place mix): element p of
``out`` is written only after element p of ``x`` and of every ``recv`` row has
been read.  The NumPy twin is ``tests/reference/kernels.py::combine``.
"""
import numba
import numpy as np

from ._flags import JIT


@numba.njit(**JIT)
def _combine(x, recv, w_self, w, out):
    n = x.shape[0]
    k = recv.shape[0]
    for p in range(n):
        acc = w_self * x[p]
        for j in range(k):
            acc += w[j] * recv[j, p]
        out[p] = acc
    return out


def combine(x, recv, w_self, w, out=None):
    """Local. ``out = w_self * x + w @ recv`` for 1-D ``x`` and 2-D ``recv``.

    ``x``, ``recv`` and ``out`` share one float dtype (float32 or float64); the
    weights are cast to it, so a float32 mix stays in float32 arithmetic.
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
    return _combine(x, recv, x.dtype.type(w_self), w, out)
