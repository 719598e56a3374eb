"""Convex loss oracles for exact tests of NEXT (ALGORITHMS.md section 1, "convex exactness").

For data X (m x d, one sample per row) and w (d,):

    least squares:  f(w) = 1/(2m) ||X w - y||^2,          grad = X^T (X w - y) / m
    logistic:       f(w) = 1/m sum_j log(1 + exp(-t_j)),  t_j = s_j x_j^T w,  s_j in {-1, +1}
                    grad = -1/m sum_j s_j sigma(-t_j) x_j,   sigma(u) = 1 / (1 + exp(-u))

(the convex problems on which NEXT, arXiv 1602.00591, must reach the
centralised minimiser; the regularizer is added by the surrogate step).  The logistic terms are evaluated stably:
log(1 + exp(-t)) = max(-t, 0) + log1p(exp(-|t|)), and sigma(-t) from exp(-|t|),
so no exp overflows for any finite t.

One pass over X per call: each row's dot product and its gradient update are
fused (the row is re-read from L1).  The gradient and the loss accumulate in
float64 whatever X's dtype; the gradient is written in w's dtype into ``out``.
The ``*_blocks`` versions split the ROWS into C contiguous blocks under
``numba.prange`` (one float64 partial gradient per block, summed in block
order afterwards): the result equals the serial one up to summation order,
and does not depend on the thread count.  NumPy twins:
``tests/reference/loss_kernels.py``.
"""
import math

import numba
import numpy as np

from . import _validate as V
from ._blas import row_dot
from ._flags import JIT, PJIT
from .threads import block_bounds

__all__ = ["least_squares", "least_squares_blocks", "logistic", "logistic_blocks"]

_LS = 0
_LOGISTIC = 1


@numba.njit(inline="always", **JIT)
def _logistic_term(t):
    """(log(1 + exp(-t)), sigma(-t)) for finite t, without overflow."""
    e = math.exp(-abs(t))
    if t >= 0.0:
        return math.log1p(e), e / (1.0 + e)
    return -t + math.log1p(e), 1.0 / (1.0 + e)


@numba.njit(**JIT)
def _rows(kind, w, X, y, acc):
    """Loss sum over the rows of X (a row block); adds the unscaled gradient into acc (float64)."""
    d = X.shape[1]
    loss = 0.0
    for i in range(X.shape[0]):
        t = row_dot(X, i, w)
        if kind == _LS:
            c = t - y[i]
            loss += 0.5 * c * c
        else:
            s = float(y[i])
            val, sig = _logistic_term(s * t)
            loss += val
            c = -s * sig
        for j in range(d):
            acc[j] += c * X[i, j]
    return loss


@numba.njit(**JIT)
def _serial(kind, w, X, y, out):
    m = X.shape[0]
    acc = np.zeros(X.shape[1])
    loss = _rows(kind, w, X, y, acc)
    inv_m = 1.0 / m
    for j in range(acc.shape[0]):
        out[j] = acc[j] * inv_m
    return loss * inv_m


@numba.njit(**PJIT)
def _blocks(kind, w, X, y, out, bounds):
    m = X.shape[0]
    nb = bounds.shape[0] - 1
    acc = np.zeros((nb, X.shape[1]))
    part = np.zeros(nb)
    for c in numba.prange(nb):
        lo = bounds[c]
        hi = bounds[c + 1]
        part[c] = _rows(kind, w, X[lo:hi], y[lo:hi], acc[c])
    inv_m = 1.0 / m
    loss = 0.0
    for c in range(nb):
        loss += part[c]
    for j in range(acc.shape[1]):
        s = 0.0
        for c in range(nb):
            s += acc[c, j]
        out[j] = s * inv_m
    return loss * inv_m


def _args(fn, w, X, y, out, labels):
    w = V.vector(fn, "w", w)
    X = V.matrix(fn, "X", X, w.dtype)
    if X.shape[1] != w.shape[0]:
        raise ValueError(f"{fn}: X has {X.shape[1]} columns but w has {w.shape[0]} entries")
    if X.shape[0] < 1:
        raise ValueError(f"{fn}: X has no rows")
    name = "s" if labels else "y"
    y = V.vector(fn, name, y, w.dtype)
    if y.shape != (X.shape[0],):
        raise ValueError(f"{fn}: {name} must have shape ({X.shape[0]},), got {y.shape}")
    if labels and not np.all(np.abs(y) == 1):
        raise ValueError(f"{fn}: labels s must be -1 or +1")
    out = V.out_like(fn, "out", out, w)
    if np.shares_memory(out, w) or np.shares_memory(out, X):
        raise ValueError(f"{fn}: out must not overlap w or X")
    return w, X, y, out


def least_squares(w, X, y, out=None):
    """Local. ``f = ||X w - y||^2 / (2m)`` and ``grad = X^T (X w - y) / m`` (into ``out``).

    ``w`` (d,), ``X`` (m, d), ``y`` (m,): one float dtype.  Returns ``(loss, out)``
    with ``loss`` a Python float.
    """
    w, X, y, out = _args("least_squares", w, X, y, out, False)
    return float(_serial(_LS, w, X, y, out)), out


def logistic(w, X, s, out=None):
    """Local. ``f = mean_j log(1 + exp(-s_j x_j^T w))`` and its gradient (into ``out``).

    Labels ``s`` in {-1, +1} with X's dtype.  Returns ``(loss, out)``.
    """
    w, X, s, out = _args("logistic", w, X, s, out, True)
    return float(_serial(_LOGISTIC, w, X, s, out)), out


def least_squares_blocks(w, X, y, n_blocks, out=None):
    """Local. :func:`least_squares` with ``numba.prange`` over ``n_blocks`` row blocks."""
    w, X, y, out = _args("least_squares_blocks", w, X, y, out, False)
    n_blocks = V.count("least_squares_blocks", "n_blocks", n_blocks, 1)
    return float(_blocks(_LS, w, X, y, out, block_bounds(X.shape[0], n_blocks))), out


def logistic_blocks(w, X, s, n_blocks, out=None):
    """Local. :func:`logistic` with ``numba.prange`` over ``n_blocks`` row blocks."""
    w, X, s, out = _args("logistic_blocks", w, X, s, out, True)
    n_blocks = V.count("logistic_blocks", "n_blocks", n_blocks, 1)
    return float(_blocks(_LOGISTIC, w, X, s, out, block_bounds(X.shape[0], n_blocks))), out
