"""NumPy twins of mpidl.kernels.losses (same names, same arguments), written for clarity."""
import numpy as np


def least_squares(w, X, y, out=None):
    """(||Xw - y||^2 / (2m), X^T (Xw - y) / m), in float64."""
    X = X.astype(np.float64)
    res = X @ w.astype(np.float64) - y
    m = X.shape[0]
    return float(res @ res / (2 * m)), _store(X.T @ res / m, w.dtype, out)


def logistic(w, X, s, out=None):
    """(mean log(1 + exp(-s x^T w)), gradient), via logaddexp / expit."""
    X = X.astype(np.float64)
    t = s * (X @ w.astype(np.float64))
    m = X.shape[0]
    loss = np.logaddexp(0.0, -t).sum() / m
    sig = np.exp(-np.logaddexp(0.0, t))          # sigma(-t) = 1 / (1 + exp(t))
    return float(loss), _store(-(X.T @ (s * sig)) / m, w.dtype, out)


def least_squares_blocks(w, X, y, n_blocks, out=None):
    return least_squares(w, X, y, out)


def logistic_blocks(w, X, s, n_blocks, out=None):
    return logistic(w, X, s, out)


def _store(g, dtype, out):
    g = g.astype(dtype)
    if out is None:
        return g
    out[...] = g
    return out
