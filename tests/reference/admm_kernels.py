"""NumPy twins of mpidl.kernels.admm (same names), written for clarity, not speed.

Arithmetic is float64 inside, cast to the input dtype at the end (as the kernels do).
"""
import numpy as np


def _relu(x):
    return np.maximum(x, 0.0)


def z_objective(z, a, z_old, q):
    """(z - a)^2 + (q - relu z)^2 + (z - z_old)^2, elementwise (nu/2 dropped)."""
    return (z - a) ** 2 + (q - _relu(z)) ** 2 + (z - z_old) ** 2


def z_update(a, z_old, q, out=None):
    """Best of the two branches z <= 0 and z >= 0 (ties go to z <= 0)."""
    a64, z64, q64 = (np.asarray(x, dtype=np.float64) for x in (a, z_old, q))
    zneg = np.minimum((a64 + z64) / 2.0, 0.0)
    zpos = np.maximum((a64 + q64 + z64) / 3.0, 0.0)
    f_neg = z_objective(zneg, a64, z64, q64)
    f_pos = z_objective(zpos, a64, z64, q64)
    return _store(np.where(f_neg <= f_pos, zneg, zpos).astype(a.dtype), out)


def z_step(z, r, q):
    a = z - r
    zn = z_update(a, z, q)
    r[...] = (zn.astype(np.float64) - a).astype(r.dtype)
    z[...] = zn
    return z


def z_step_dual(z, r, q, nu):
    """z_step, and q <- nu (q - relu(z_old)) (the implicit dual) from the values on entry."""
    u = nu * (q.astype(np.float64) - _relu(z.astype(np.float64)))
    z_step(z, r, q)
    q[...] = u.astype(q.dtype)
    return z


def q_update(z, p_next, u, nu, rho, out=None):
    q = (nu * _relu(z.astype(np.float64)) + rho * p_next.astype(np.float64) + u) / (nu + rho)
    return _store(q.astype(z.dtype), out)


def u_update(u, p_next, q, rho):
    u[...] = (u.astype(np.float64) + rho * (p_next.astype(np.float64) - q)).astype(u.dtype)
    return u


def axpy(y, x, c):
    y[...] = (y.astype(np.float64) + c * x.astype(np.float64)).astype(y.dtype)
    return y


def p_grad(g, p, q_prev, u_prev, nu, rho):
    g[...] = (-nu * g.astype(np.float64) + u_prev + rho * (p.astype(np.float64) - q_prev)).astype(g.dtype)
    return g


def p_grad_dual(g, p, q_prev, z_prev, nu, rho):
    u_prev = nu * (q_prev.astype(np.float64) - _relu(z_prev.astype(np.float64)))
    return p_grad(g, p, q_prev, u_prev, nu, rho)


def sumsq(x):
    return float(np.sum(x.astype(np.float64) ** 2))


def center_columns(r, b):
    m = r.astype(np.float64).mean(axis=0)
    b[...] = (b.astype(np.float64) + m).astype(b.dtype)
    r[...] = (r.astype(np.float64) - m).astype(r.dtype)
    return m


def resid_refresh(r, z, b):
    r[...] = (z.astype(np.float64) - b.astype(np.float64) - r).astype(r.dtype)
    return r


def backtrack_on(f, x, g, tau0, max_doublings, eta=2.0):
    """Backtracking by evaluating ``f`` (a callable) at the trial points, as the paper states it.

    Returns (t, doublings, accepted): the first t = tau0 eta^k (k <= max_doublings)
    with f(x - g/t) <= f(x) + <g, d> + (t/2)||d||^2, d = -g/t.
    """
    f0 = f(x)
    t = tau0
    for k in range(max_doublings + 1):
        d = -g / t
        if f(x + d) <= f0 + np.sum(g * d) + t / 2 * np.sum(d * d):
            return t, k, True
        if k < max_doublings:
            t *= eta
    return t, max_doublings, False


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _lse(z):
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def ce_objective(z, a, y, nu):
    """Per-row CE(z_i; y_i) + (nu/2)||z_i - a_i||^2."""
    return _lse(z) - z[np.arange(len(y)), y] + 0.5 * nu * ((z - a) ** 2).sum(axis=1)


def ce_prox(a, y, z0, nu, step, max_iter, tol, out=None, ce=None):
    """All rows at once; a row stops (freezes) when its objective changed by <= tol."""
    a64 = a.astype(np.float64)
    x = z0.astype(np.float64).copy()
    v = x.copy()
    t = np.ones(len(y))
    active = np.ones(len(y), dtype=bool)
    iters = np.zeros(len(y), dtype=np.int64)
    onehot = np.eye(a.shape[1])[y]
    f_old = ce_objective(x, a64, y, nu)
    for _ in range(max_iter):
        if not active.any():
            break
        ix = np.flatnonzero(active)
        g = _softmax(v[ix]) - onehot[ix]
        xn = (v[ix] - step * g + step * nu * a64[ix]) / (1.0 + step * nu)
        tn = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t[ix] ** 2))
        v[ix] = xn + ((t[ix] - 1.0) / tn)[:, None] * (xn - x[ix])
        x[ix] = xn
        t[ix] = tn
        iters[ix] += 1
        f_new = ce_objective(x[ix], a64[ix], y[ix], nu)
        done = np.abs(f_new - f_old[ix]) <= tol
        f_old[ix] = f_new
        active[ix[done]] = False
    res = _store(x.astype(a.dtype), out)
    ce_rows = _lse(x) - x[np.arange(len(y)), y]
    if ce is not None:
        ce[...] = ce_rows
    return res, ce_rows, int(iters.max(initial=0))


def _store(v, out):
    if out is None:
        return v
    out[...] = v
    return out
