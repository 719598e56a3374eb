"""NumPy twins of mpidl.kernels.quantize: nearest grid point by argmin of |v - delta_i|."""
import numpy as np


def grid(lo, hi, n, dtype=np.float32):
    return (lo + np.arange(n, dtype=np.float64) * ((hi - lo) / (n - 1))).astype(dtype)


def index_dtype(n):
    return np.dtype(np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.uint32)


def quantize(v, lo, hi, n, out_idx=None):
    """Index of the nearest grid point (the lower one on an exact tie), NaN -> 0."""
    g = grid(lo, hi, n, np.float64)
    flat = np.asarray(v, dtype=np.float64).reshape(-1)
    idx = np.empty(flat.size, dtype=np.int64)
    for s in range(0, flat.size, 4096):
        chunk = flat[s:s + 4096]
        idx[s:s + 4096] = np.argmin(np.abs(chunk[:, None] - g[None, :]), axis=1)
    idx[np.isnan(flat)] = 0
    idx = idx.reshape(np.shape(v)).astype(index_dtype(n))
    if out_idx is not None:
        out_idx[...] = idx
        return out_idx
    return idx


def dequantize(idx, lo, hi, n, dtype=np.float32, out=None):
    vals = grid(lo, hi, n, np.float64)[np.asarray(idx, dtype=np.int64)].astype(dtype)
    if out is not None:
        out[...] = vals
        return out
    return vals


def q_update_quantized(z, p_next, u, nu, rho, lo, hi, n, out=None, out_idx=None):
    q = (nu * np.maximum(z.astype(np.float64), 0) + rho * p_next.astype(np.float64) + u) / (nu + rho)
    idx = quantize(q, lo, hi, n, out_idx)
    return dequantize(idx, lo, hi, n, z.dtype, out), idx
