"""NumPy twins of mpidl.kernels.prox (same names, same arguments), written for clarity."""
import numpy as np


def soft_threshold(v, lam, out=None):
    """sign(v) * max(|v| - lam, 0)."""
    lam = v.dtype.type(lam)
    p = np.sign(v) * np.maximum(np.abs(v) - lam, 0)
    return _store(p.astype(v.dtype), out)


def prox_l2(v, lam, out=None):
    """v / (1 + 2 lam)."""
    return _store((v / (1.0 + 2.0 * lam)).astype(v.dtype), out)


def prox(v, t, reg, lam, out=None):
    """prox of t * r at v, r in {none, l1 (lam||.||_1), l2 (lam||.||^2)}."""
    if reg == "l1":
        return soft_threshold(v, t * lam, out)
    if reg == "l2":
        return prox_l2(v, t * lam, out)
    if reg == "none":
        return _store(v.copy(), out)
    raise ValueError(reg)


def _store(p, out):
    if out is None:
        return p
    out[...] = p
    return out
