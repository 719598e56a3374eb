"""Quantisation onto a fixed uniform grid (pdADMM-G-Q, Wang et al., arXiv 2105.09837).

The grid has ``n`` evenly spaced points on [lo, hi]:

    delta_i = lo + i * s,   s = (hi - lo) / (n - 1),   i = 0 .. n - 1   (float64, then cast)

:func:`quantize` maps a value v to the index of its nearest grid point,
``i = clip(floor((v - lo) / s + 1/2), 0, n - 1)`` (values outside [lo, hi] go to
the nearest end point; NaN goes to 0), in the smallest unsigned integer type
that holds ``n - 1`` (:func:`index_dtype`: uint8 up to 256 points, uint16 up to
65536 -- 1000 points give uint16, 2 bytes instead of 4 per float32 value).
:func:`dequantize` maps indices back to grid values.  :func:`q_update_quantized`
fuses the q update of pdADMM with the projection: it writes both the grid
value and its index in one pass.

Every kernel runs ``numba.prange`` over 64 fixed blocks.  NumPy twins:
``tests/reference/quantize_kernels.py`` (nearest point by argmin of |v - delta|).
"""
import math

import numba
import numpy as np

from . import _validate as V
from ._flags import JIT, PJIT
from .admm import _arr, _bounds, _flat, _like

__all__ = ["index_dtype", "grid", "check_grid", "quantize", "dequantize", "q_update_quantized"]


def index_dtype(n):
    """Local. Smallest unsigned integer dtype that holds the indices 0 .. n - 1."""
    n = V.count("index_dtype", "n", n, 2)
    for dt in (np.uint8, np.uint16, np.uint32):
        if n - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"index_dtype: a grid of {n} points needs more than 32-bit indices")


def check_grid(lo, hi, n, dtype=np.float32):
    """Local. Validate a grid (raise ValueError with the reason) and return ``(lo, hi, n)``.

    Needs n >= 2, lo < hi, finite ends, and a spacing that ``dtype`` resolves
    (adjacent points distinct after rounding to ``dtype``).
    """
    fn = "grid"
    lo = V.scalar(fn, "lo", lo)
    hi = V.scalar(fn, "hi", hi)
    n = V.count(fn, "n", n, 2)
    if not lo < hi:
        raise ValueError(f"{fn}: the grid needs lo < hi, got lo={lo}, hi={hi}")
    index_dtype(n)
    g = grid(lo, hi, n, np.float64)
    gd = g.astype(dtype)
    if np.any(np.diff(gd) <= 0):
        raise ValueError(f"{fn}: {n} points on [{lo}, {hi}] are closer than {np.dtype(dtype).name} "
                         "resolves; use fewer points or a wider range")
    return lo, hi, n


def grid(lo, hi, n, dtype=np.float32):
    """Local. The grid points ``lo + i (hi - lo)/(n - 1)`` computed in float64, cast to ``dtype``."""
    s = (float(hi) - float(lo)) / (int(n) - 1)
    return (float(lo) + np.arange(int(n), dtype=np.float64) * s).astype(dtype)


@numba.njit(inline="always", **JIT)
def _index(v, lo, inv_s, nmax):
    t = (np.float64(v) - lo) * inv_s + 0.5
    if not t >= 0.0:        # also NaN
        return 0
    i = math.floor(t)
    if i > nmax:
        return nmax
    return int(i)


@numba.njit(**PJIT)
def _quantize(v, lo, s, nmax, idx, bounds):
    inv_s = 1.0 / s
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            idx[i] = _index(v[i], lo, inv_s, nmax)
    return idx


@numba.njit(**PJIT)
def _dequantize(idx, lo, s, out, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            out[i] = lo + np.float64(idx[i]) * s
    return out


@numba.njit(**PJIT)
def _q_update_quantized(z, p, u, nu, rho, lo, s, nmax, out, idx, bounds):
    inv = 1.0 / (nu + rho)
    inv_s = 1.0 / s
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            zr = np.float64(z[i])
            if zr < 0.0:
                zr = 0.0
            q = (nu * zr + rho * np.float64(p[i]) + np.float64(u[i])) * inv
            k = _index(q, lo, inv_s, nmax)
            idx[i] = k
            out[i] = lo + np.float64(k) * s
    return out


def _idx_out(fn, out, like, n):
    dt = index_dtype(n)
    if out is None:
        return np.empty(like.shape, dtype=dt)
    if not isinstance(out, np.ndarray) or out.shape != like.shape or out.dtype != dt \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{fn}: out_idx must be a writable C-contiguous {dt.name} array of shape {like.shape}")
    return out


def quantize(v, lo, hi, n, out_idx=None):
    """Local. Index of the nearest point of the (lo, hi, n) grid for every entry of ``v``."""
    fn = "quantize"
    v = _arr(fn, "v", v)
    lo, hi, n = check_grid(lo, hi, n, v.dtype)
    idx = _idx_out(fn, out_idx, v, n)
    _quantize(_flat(v), lo, (hi - lo) / (n - 1), n - 1, _flat(idx), _bounds(v.size))
    return idx


def dequantize(idx, lo, hi, n, dtype=np.float32, out=None):
    """Local. Grid values ``lo + idx (hi - lo)/(n - 1)`` (float64, cast to ``dtype``)."""
    fn = "dequantize"
    idx = np.asarray(idx)
    if idx.dtype.kind not in "ui" or not idx.flags.c_contiguous:
        raise TypeError(f"{fn}: idx must be a C-contiguous integer array, got {idx.dtype}")
    lo, hi, n = check_grid(lo, hi, n, dtype)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) > n - 1):
        raise ValueError(f"{fn}: indices must lie in [0, {n - 1}]")
    if out is None:
        out = np.empty(idx.shape, dtype=dtype)
    elif out.shape != idx.shape or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(f"{fn}: out must be C-contiguous {np.dtype(dtype).name} of shape {idx.shape}")
    _dequantize(_flat(idx), lo, (hi - lo) / (n - 1), _flat(out), _bounds(idx.size))
    return out


def q_update_quantized(z, p_next, u, nu, rho, lo, hi, n, out=None, out_idx=None):
    """Local. q = (nu relu(z) + rho p_next + u)/(nu + rho) projected onto the grid.

    Returns ``(q_values, indices)``; ``q_values == dequantize(indices)`` bitwise.
    """
    fn = "q_update_quantized"
    z = _arr(fn, "z", z)
    p_next, u = _like(fn, "p_next", p_next, z), _like(fn, "u", u, z)
    nu = V.scalar(fn, "nu", nu, lo=0.0, lo_open=True)
    rho = V.scalar(fn, "rho", rho, lo=0.0, lo_open=True)
    lo, hi, n = check_grid(lo, hi, n, z.dtype)
    out = V.out_like(fn, "out", out, z)
    for arr, nm in ((z, "z"), (p_next, "p_next"), (u, "u")):
        V.exact_alias(fn, "out", out, arr, nm)
    idx = _idx_out(fn, out_idx, z, n)
    _q_update_quantized(_flat(z), _flat(p_next), _flat(u), nu, rho, lo, (hi - lo) / (n - 1), n - 1,
                        _flat(out), _flat(idx), _bounds(z.size))
    return out, idx
