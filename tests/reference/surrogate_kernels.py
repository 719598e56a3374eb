"""NumPy twins of mpidl.kernels.surrogate (same names, same arguments), written for clarity.

The Gauss-Newton twins run the same algorithms (CG, strongly convex FISTA with a
power-iteration step bound) with the same stopping rules, in plain dense NumPy.
"""
import numpy as np

from .prox_kernels import soft_threshold

POWER_ITERS = 30
POWER_MARGIN = 1.1


def linearized_solve(w, g, pi, tau, reg, lam, out=None):
    """argmin_v (g + pi)^T (v - w) + tau/2 ||v - w||^2 + r(v), closed form."""
    if reg == "none":
        wt = w - (g + pi) / tau
    elif reg == "l2":
        wt = (tau * w - g - pi) / (tau + 2.0 * lam)
    elif reg == "l1":
        wt = soft_threshold(w - (g + pi) / tau, lam / tau)
    else:
        raise ValueError(reg)
    return _store(wt.astype(w.dtype), out)


def linearized_step(w, g, pi, tau, alpha, reg, lam, out_wt=None, out_z=None):
    """(w~, z) with z = w + alpha (w~ - w)."""
    wt = linearized_solve(w, g, pi, tau, reg, lam)
    z = relax(w, wt, alpha)
    return _store(wt, out_wt), _store(z, out_z)


def linearized_step_blocks(w, g, pi, tau, alpha, reg, lam, n_blocks, out_wt=None, out_z=None):
    """Block by block (np.array_split), the same closed form."""
    wt = np.empty_like(w)
    z = np.empty_like(w)
    for idx in np.array_split(np.arange(w.shape[0]), min(n_blocks, max(w.shape[0], 1))):
        wt[idx], z[idx] = linearized_step(w[idx], g[idx], pi[idx], tau, alpha, reg, lam)
    return _store(wt, out_wt), _store(z, out_z)


def relax(w, wt, alpha, out=None):
    """w + alpha (w~ - w)."""
    return _store((w + w.dtype.type(alpha) * (wt - w)).astype(w.dtype), out)


def gn_solve(w, J, r, pi, tau, reg, lam, n_samples, max_iter=100, tol=1e-10, out=None):
    """argmin_v 1/(2m')||r + J(v - w)||^2 + pi^T(v - w) + tau/2||v - w||^2 + r(v); (v, iters)."""
    J = J.astype(np.float64)
    r = r.astype(np.float64)
    w64 = w.astype(np.float64)
    pi = pi.astype(np.float64)
    m = float(n_samples)
    if reg == "l1":
        sol, it = _fista(w64, J, r, pi, tau, lam, m, max_iter, tol)
    else:
        lam2 = 2.0 * lam if reg == "l2" else 0.0
        sol, it = _cg(w64, J, r, pi, tau + lam2, lam2, m, max_iter, tol)
    return _store(sol.astype(w.dtype), out), it


def gn_solve_blocks(w, J, r, pi, tau, reg, lam, n_samples, n_blocks, max_iter=100, tol=1e-10,
                    out=None):
    """Block-Jacobi: gn_solve on each column block, other blocks frozen at w."""
    sol = np.empty_like(w)
    iters = []
    for idx in np.array_split(np.arange(w.shape[0]), min(n_blocks, max(w.shape[0], 1))):
        sol[idx], it = gn_solve(w[idx], J[:, idx], r, pi[idx], tau, reg, lam, n_samples,
                                max_iter, tol)
        iters.append(it)
    return _store(sol, out), np.array(iters, dtype=np.int64)


def _cg(w, J, r, pi, c, lam2, m, max_iter, tol):
    """CG on (J^T J / m + c I) d = -(J^T r / m + pi + lam2 w)."""
    b = -(J.T @ r / m + pi + lam2 * w)
    x = np.zeros_like(w)
    res = b.copy()
    p = res.copy()
    rs = res @ res
    thr = tol * tol * rs
    it = 0
    while it < max_iter and rs > thr:
        ap = J.T @ (J @ p) / m + c * p
        pap = p @ ap
        if not pap > 0:
            break
        a = rs / pap
        x = x + a * p
        res = res - a * ap
        rs_new = res @ res
        p = res + (rs_new / rs) * p
        rs = rs_new
        it += 1
    return w + x, it


def power_bound(J):
    """min(1.1 * power estimate of ||J||_2^2 (30 steps, fixed start), ||J||_F^2)."""
    n = J.shape[1]
    f = np.arange(1, n + 1) * 0.6180339887498949
    v = 1.0 + (f - np.floor(f))
    v = v / np.linalg.norm(v)
    est = 0.0
    for _ in range(POWER_ITERS):
        u = J.T @ (J @ v)
        est = np.linalg.norm(u)
        if est == 0.0:
            break
        v = u / est
    return min(POWER_MARGIN * est, float(np.sum(J * J)))


def _fista(w, J, r, pi, tau, lam, m, max_iter, tol):
    """FISTA with constant momentum for the tau-strongly convex l1 problem."""
    big_l = tau + power_bound(J) / m
    q = np.sqrt(tau / big_l)
    beta = (1.0 - q) / (1.0 + q)
    x = w.copy()
    y = w.copy()
    thr = 0.0
    it = 0
    while it < max_iter:
        d = y - w
        grad = J.T @ (r + J @ d) / m + pi + tau * d
        x_new = soft_threshold(y - grad / big_l, lam / big_l)
        g2 = big_l ** 2 * np.sum((y - x_new) ** 2)
        if it == 0:
            thr = tol * tol * g2
        it += 1
        if g2 <= thr:
            x = x_new
            break
        y = x_new + beta * (x_new - x)
        x = x_new
    return x, it


def _store(p, out):
    if out is None:
        return p
    out[...] = p
    return out
