"""NumPy twins of mpidl.kernels (same names, same arguments)."""
import numpy as np


def combine(x, recv, w_self, w, out=None):
    """out = w_self * x + sum_j w[j] * recv[j], accumulated in x's dtype."""
    dt = x.dtype.type
    acc = dt(w_self) * x
    for j in range(recv.shape[0]):
        acc = acc + dt(w[j]) * recv[j]
    if out is None:
        return acc
    out[...] = acc
    return out
