"""Proximal operators of the NEXT regularizers r(w) (ALGORITHMS.md section 1).

For a step t > 0 and a convex r, ``prox_{t r}(v) = argmin_p  r(p) + ||p - v||^2 / (2 t)``.
The regularizers of NEXT (arXiv 1602.00591; for neural networks arXiv
1610.07448) are r(w) = lam ||w||_1 and r(w) = lam ||w||_2^2, elementwise:

    l1:  prox_{lam ||.||_1}(v)_p = sign(v_p) max(|v_p| - lam, 0)   (soft threshold)
    l2:  prox_{lam ||.||^2}(v)   = v / (1 + 2 lam)
    none: prox(v) = v

Soft threshold is computed branch-free as ``v - clip(v, -lam, lam)`` (exact
zeros inside the dead zone, NaN propagates, vectorises without fastmath).
Every kernel is one pass over memory; ``out`` may alias ``v`` exactly (then a
one-array in-place kernel runs), not partially (ValueError).  NumPy twins:
``tests/reference/prox_kernels.py``.
"""
import numba
import numpy as np

from . import _validate as V
from ._flags import JIT

__all__ = ["soft_threshold", "prox_l2", "prox"]


@numba.njit(inline="always", **JIT)
def _st(x, t):
    """Scalar soft threshold ``x - clip(x, -t, t)`` (t >= 0, same float type as x)."""
    c = x if x < t else t
    c = c if c > -t else -t
    return x - c


@numba.njit(**JIT)
def _soft_threshold(v, thresh, out):
    for p in range(v.shape[0]):
        out[p] = _st(v[p], thresh)
    return out


@numba.njit(**JIT)
def _soft_threshold_inplace(v, thresh):
    for p in range(v.shape[0]):
        v[p] = _st(v[p], thresh)
    return v


@numba.njit(**JIT)
def _scale(v, s, out):
    for p in range(v.shape[0]):
        out[p] = s * v[p]
    return out


@numba.njit(**JIT)
def _scale_inplace(v, s):
    for p in range(v.shape[0]):
        v[p] *= s
    return v


def _prep(fn, v, out):
    """(v, out, in_place).  In-place calls go to one-array kernels: with two array
    arguments LLVM's runtime alias check fails for out == v and the loop runs
    scalar (measured 3x slower in cache)."""
    v = V.vector(fn, "v", v)
    out = V.out_like(fn, "out", out, v)
    return v, out, V.exact_alias(fn, "out", out, v, "v")


def _soft(v, thresh, out, in_place):
    thresh = v.dtype.type(thresh)
    if in_place:
        _soft_threshold_inplace(out, thresh)
        return out
    return _soft_threshold(v, thresh, out)


def _mul(v, s, out, in_place):
    s = v.dtype.type(s)
    if in_place:
        _scale_inplace(out, s)
        return out
    return _scale(v, s, out)


def soft_threshold(v, lam, out=None):
    """Local. ``prox_{lam ||.||_1}(v) = sign(v) * max(|v| - lam, 0)`` elementwise.

    ``v``: 1-D float32/float64; ``lam >= 0`` (cast to v's dtype); ``out`` may
    alias ``v``.  Returns ``out``.
    """
    v, out, in_place = _prep("soft_threshold", v, out)
    lam = V.scalar("soft_threshold", "lam", lam, lo=0.0)
    return _soft(v, lam, out, in_place)


def prox_l2(v, lam, out=None):
    """Local. ``prox_{lam ||.||^2}(v) = v / (1 + 2 lam)`` (argmin_p lam||p||^2 + ||p - v||^2/2).

    ``lam >= 0``; computed as one multiply by ``1/(1 + 2 lam)`` rounded to v's
    dtype.  ``out`` may alias ``v``.  Returns ``out``.
    """
    v, out, in_place = _prep("prox_l2", v, out)
    lam = V.scalar("prox_l2", "lam", lam, lo=0.0)
    return _mul(v, 1.0 / (1.0 + 2.0 * lam), out, in_place)


def prox(v, t, reg, lam, out=None):
    """Local. ``prox_{t r}(v)`` for ``r`` = ``reg`` in {"none", "l1", "l2"} with weight ``lam``.

    ``l1``: soft threshold at ``t lam``; ``l2``: ``v / (1 + 2 t lam)``;
    ``none``: a copy of ``v`` (nothing is copied when ``out`` is ``v``).
    ``t > 0``, ``lam >= 0``; ``out`` may alias ``v``.  Returns ``out``.
    """
    code = V.reg_code("prox", reg)
    v, out, in_place = _prep("prox", v, out)
    t = V.scalar("prox", "t", t, lo=0.0, lo_open=True)
    lam = V.scalar("prox", "lam", lam, lo=0.0)
    if code == 1:
        return _soft(v, t * lam, out, in_place)
    if code == 2:
        return _mul(v, 1.0 / (1.0 + 2.0 * t * lam), out, in_place)
    if not in_place:
        np.copyto(out, v)
    return out
