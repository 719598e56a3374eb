"""Input checks shared by the public kernels (private; NumPy only)."""
import math

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

REGS = {"none": 0, "l1": 1, "l2": 2}
"""Regularizer names -> the integer code the Numba kernels branch on."""


def vector(fn, name, v, dtype=None):
    """Return ``v`` as a 1-D float32/float64 array (no copy), or raise."""
    v = np.asarray(v)
    if v.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {v.shape}")
    if v.dtype not in FLOATS:
        raise TypeError(f"{fn}: {name} must have dtype float32 or float64, got {v.dtype}")
    if dtype is not None and v.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {v.dtype}, expected {np.dtype(dtype)}")
    return v


def matrix(fn, name, a, dtype):
    """Return ``a`` as a 2-D array of ``dtype`` (no copy), or raise."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{fn}: {name} must be 2-D, got shape {a.shape}")
    if a.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    return a


def same_shape(fn, name, v, like):
    if v.shape != like.shape:
        raise ValueError(f"{fn}: {name} has shape {v.shape}, expected {like.shape}")


def out_like(fn, name, out, like):
    """``out`` if it matches ``like`` in shape and dtype, a new array if None, else raise."""
    if out is None:
        return np.empty_like(like)
    if not isinstance(out, np.ndarray) or out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(f"{fn}: {name} must be an ndarray of shape {like.shape} and "
                         f"dtype {like.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only")
    return out


def exact_alias(fn, name, out, arr, arr_name):
    """True if ``out`` is ``arr``'s memory element for element; raise on a partial overlap.

    Elementwise kernels read element p of every input before writing element p
    of the outputs, so an exact alias is safe; a shifted overlap is not.
    """
    if out is arr:
        return True
    if not np.may_share_memory(out, arr):
        return False
    if (out.ctypes.data == arr.ctypes.data and out.strides == arr.strides
            and out.shape == arr.shape):
        return True
    raise ValueError(f"{fn}: {name} partially overlaps {arr_name}; alias it exactly or not at all")


def scalar(fn, name, x, lo=None, lo_open=False):
    """``float(x)``, finite, and ``> lo`` (``lo_open``) or ``>= lo``; else raise."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a real scalar, got {x!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{fn}: {name} must be finite, got {x}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise ValueError(f"{fn}: {name} must be {'>' if lo_open else '>='} {lo}, got {x}")
    return x


def count(fn, name, n, lo):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < lo:
        raise ValueError(f"{fn}: {name} must be an integer >= {lo}, got {n!r}")
    return int(n)


def reg_code(fn, reg):
    try:
        return REGS[reg]
    except (KeyError, TypeError):
        raise ValueError(f"{fn}: reg must be one of {sorted(REGS)}, got {reg!r}") from None
