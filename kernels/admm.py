"""pdADMM per-layer kernels (ALGORITHMS.md section 4; Wang et al., arXiv 2009.02868).

Layer l of an MLP holds W_l, b_l, the pre-activation z_l, its input p_l, its
output q_l and the dual u_l of the coupling p_{l+1} = q_l.  Row layout: one
row per sample, ``a_l = p_l W_l^T + b_l`` (N x n_l).  The elementwise updates
(weights nu, rho > 0; every equation is elementwise):

    z (l < L):  argmin_z (z - a)^2 + (q - relu z)^2 + (z - z_old)^2
                (nu/2 times each term; nu cancels).  Two branches:
                  z- = min((a + z_old) / 2, 0)          (best z <= 0)
                  z+ = max((a + q + z_old) / 3, 0)      (best z >= 0)
                keep z- when f(z-) <= f(z+), else z+   (:func:`z_update`)
    q (l < L):  q = (nu relu(z) + rho p_{l+1} + u) / (nu + rho)        (:func:`q_update`)
    u (l < L):  u <- u + rho (p_{l+1} - q)                             (:func:`u_update`)
                Unquantised, u = nu (q - relu z) holds after every q/u update, so
                u can stay implicit: :func:`z_step_dual` leaves u_old = nu (q - relu z_old)
                in q's buffer for the q update, :func:`p_grad_dual` forms u_{l-1}
                from q_{l-1} and z_{l-1}.
    z_L:        argmin_z CE(z; y) + (nu/2) ||z - a||^2, row by row, by
                FISTA with step s:  x+ = (y_k - s (softmax(y_k) - e_y) + s nu a) / (1 + s nu),
                t+ = (1 + sqrt(1 + 4 t^2)) / 2, y_{k+1} = x+ + ((t - 1)/t+)(x+ - x);
                stopped per row when |F(x+) - F(x)| <= tol or after max_iter steps
                (:func:`ce_prox`)

Bounded backtracking (:func:`backtrack`) for the gradient steps on p and W.
Both objectives are quadratics, f(x - g/t) = f(x) - ||g||^2/t + g^T H g/(2 t^2)
with g^T H g computed from one GEMM, so the test "f(x - g/t) <= f(x) -
||g||^2/(2t)" (the quadratic upper bound of the paper at the trial point) is
evaluated exactly without re-evaluating f: t starts at tau0 and doubles at most
``max_doublings`` times; when the bound never holds the step is rejected
(the caller keeps x), as in the public code.  It can never loop forever.

The residual R = z - a is kept between updates so that the GEMMs of one
iteration are only the four gradient/curvature products (pdadmm.py);
:func:`z_step` reads a = z - R and writes z and R = z_new - a in one pass.

Elementwise kernels take C-contiguous arrays of any shape (viewed flat) and
run ``numba.prange`` over 64 fixed blocks; reductions (:func:`sumsq`,
:func:`center_columns`) add float64 block partials in block order, so every
result is independent of the thread count.  NumPy twins:
``tests/reference/admm_kernels.py``.
"""
import math

import numba
import numpy as np

from . import _validate as V
from ._flags import JIT, PJIT

__all__ = ["z_update", "z_step", "z_step_dual", "q_update", "u_update", "backtrack", "ce_prox", "sumsq",
           "axpy", "p_grad", "p_grad_dual", "center_columns", "resid_refresh"]

NB = 64
"""Fixed number of blocks of every prange kernel (results do not depend on threads)."""


def _bounds(n):
    c = max(1, min(NB, n))
    size, extra = divmod(n, c)
    b = np.zeros(c + 1, dtype=np.int64)
    b[1:] = size
    b[1:extra + 1] += 1
    return np.cumsum(b)


# -- scalar pieces -------------------------------------------------------------
@numba.njit(inline="always", **JIT)
def _zscalar(a, z0, q):
    a = np.float64(a)
    z0 = np.float64(z0)
    q = np.float64(q)
    zn = 0.5 * (a + z0)
    if zn > 0.0:
        zn = 0.0
    zp = (a + q + z0) / 3.0
    if zp < 0.0:
        zp = 0.0
    fn = (zn - a) ** 2 + q * q + (zn - z0) ** 2
    fp = (zp - a) ** 2 + (q - zp) ** 2 + (zp - z0) ** 2
    return zn if fn <= fp else zp


# -- elementwise kernels -------------------------------------------------------
@numba.njit(**PJIT)
def _z_update(a, z0, q, out, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            out[i] = _zscalar(a[i], z0[i], q[i])
    return out


@numba.njit(**PJIT)
def _z_step(z, r, q, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            a = z[i] - r[i]
            zn = _zscalar(a, z[i], q[i])
            z[i] = zn
            r[i] = zn - a
    return z


@numba.njit(**PJIT)
def _z_step_dual(z, r, q, nu, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            z0 = np.float64(z[i])
            q0 = np.float64(q[i])
            a = z0 - np.float64(r[i])
            zn = _zscalar(a, z0, q0)
            z[i] = zn
            r[i] = zn - a
            q[i] = nu * (q0 - max(z0, 0.0))
    return z


@numba.njit(**PJIT)
def _q_update(z, p, u, nu, rho, out, bounds):
    inv = 1.0 / (nu + rho)
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            zr = np.float64(z[i])
            if zr < 0.0:
                zr = 0.0
            out[i] = (nu * zr + rho * np.float64(p[i]) + np.float64(u[i])) * inv
    return out


@numba.njit(**PJIT)
def _u_update(u, p, q, rho, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            u[i] = np.float64(u[i]) + rho * (np.float64(p[i]) - np.float64(q[i]))
    return u


@numba.njit(**PJIT)
def _axpy(y, x, c0, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            y[i] = np.float64(y[i]) + c0 * np.float64(x[i])
    return y


@numba.njit(**PJIT)
def _p_grad(g, p, q, u, nu, rho, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            g[i] = -nu * np.float64(g[i]) + np.float64(u[i]) + rho * (np.float64(p[i]) - np.float64(q[i]))
    return g


@numba.njit(**PJIT)
def _p_grad_dual(g, p, q, zq, nu, rho, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            qi = np.float64(q[i])
            u = nu * (qi - max(np.float64(zq[i]), 0.0))
            g[i] = -nu * np.float64(g[i]) + u + rho * (np.float64(p[i]) - qi)
    return g


@numba.njit(**PJIT)
def _sumsq(x, bounds):
    nb = bounds.shape[0] - 1
    part = np.zeros(nb)
    for c in numba.prange(nb):
        s = 0.0
        for i in range(bounds[c], bounds[c + 1]):
            v = np.float64(x[i])
            s += v * v
        part[c] = s
    tot = 0.0
    for c in range(nb):
        tot += part[c]
    return tot


@numba.njit(**PJIT)
def _center_columns(r, b, bounds):
    nb = bounds.shape[0] - 1
    m = r.shape[1]
    part = np.zeros((nb, m))
    for c in numba.prange(nb):
        for i in range(bounds[c], bounds[c + 1]):
            for j in range(m):
                part[c, j] += r[i, j]
    mean = np.zeros(m)
    for c in range(nb):
        for j in range(m):
            mean[j] += part[c, j]
    for j in range(m):
        mean[j] /= r.shape[0]
        b[j] = np.float64(b[j]) + mean[j]
    for c in numba.prange(nb):
        for i in range(bounds[c], bounds[c + 1]):
            for j in range(m):
                r[i, j] = np.float64(r[i, j]) - mean[j]
    return mean


@numba.njit(**PJIT)
def _resid_refresh(r, z, b, bounds):
    m = r.shape[1]
    for c in numba.prange(bounds.shape[0] - 1):
        for i in range(bounds[c], bounds[c + 1]):
            for j in range(m):
                r[i, j] = np.float64(z[i, j]) - np.float64(b[j]) - np.float64(r[i, j])
    return r


@numba.njit(**JIT)
def _backtrack(gg, ghg, tau0, eta, max_doublings):
    t = tau0
    for k in range(max_doublings + 1):
        decrease = gg / t - ghg / (2.0 * t * t)       # f(x) - f(x - g/t)
        if decrease >= gg / (2.0 * t):                # f(x - g/t) <= f(x) - ||g||^2/(2t)
            return t, k, True
        if k < max_doublings:
            t = t * eta
    return t, max_doublings, False


@numba.njit(**PJIT)
def _ce_prox(a, y, z0, nu, step, max_iter, tol, out, ce, bounds):
    nb = bounds.shape[0] - 1
    m = a.shape[1]
    iters = np.zeros(nb, dtype=np.int64)
    for c in numba.prange(nb):
        x = np.empty(m)
        v = np.empty(m)
        av = np.empty(m)
        used = 0
        for i in range(bounds[c], bounds[c + 1]):
            lab = y[i]
            for j in range(m):
                x[j] = z0[i, j]
                v[j] = x[j]
                av[j] = a[i, j]
            f_old = _ce_obj(x, av, lab, nu)
            t = 1.0
            its = 0
            for it in range(max_iter):
                mx = v[0]
                for j in range(1, m):
                    if v[j] > mx:
                        mx = v[j]
                s = 0.0
                for j in range(m):
                    s += math.exp(v[j] - mx)
                tn = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
                mom = (t - 1.0) / tn
                for j in range(m):
                    g = math.exp(v[j] - mx) / s - (1.0 if j == lab else 0.0)
                    xn = (v[j] - step * g + step * nu * av[j]) / (1.0 + step * nu)
                    v[j] = xn + mom * (xn - x[j])
                    x[j] = xn
                t = tn
                its = it + 1
                f_new = _ce_obj(x, av, lab, nu)
                if abs(f_new - f_old) <= tol:
                    break
                f_old = f_new
            if its > used:
                used = its
            for j in range(m):
                out[i, j] = x[j]
            ce[i] = _lse(x) - x[lab]
        iters[c] = used
    return iters.max()


@numba.njit(**JIT)
def _lse(x):
    mx = x[0]
    for j in range(1, x.shape[0]):
        if x[j] > mx:
            mx = x[j]
    s = 0.0
    for j in range(x.shape[0]):
        s += math.exp(x[j] - mx)
    return mx + math.log(s)


@numba.njit(**JIT)
def _ce_obj(x, a, lab, nu):
    q = 0.0
    for j in range(x.shape[0]):
        q += (x[j] - a[j]) ** 2
    return _lse(x) - x[lab] + 0.5 * nu * q


# -- validation helpers -----------------------------------------------------------
def _arr(fn, name, x, dtype=None, ndim=None):
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if x.dtype not in V.FLOATS:
        raise TypeError(f"{fn}: {name} must have dtype float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{fn}: {name} must be C-contiguous")
    return x


def _like(fn, name, x, like):
    x = _arr(fn, name, x, like.dtype)
    V.same_shape(fn, name, x, like)
    return x


def _writable(fn, name, x):
    if not x.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only")
    return x


def _flat(x):
    return x.reshape(-1)


# -- public kernels -------------------------------------------------------------
def z_update(a, z_old, q, out=None):
    """Local. Two-branch z update of a hidden layer, elementwise (see module docstring).

    ``a = W p + b``, ``z_old`` and ``q`` of one shape and dtype.  ``out`` may
    alias ``z_old`` or ``a`` exactly.  Returns ``out``.
    """
    fn = "z_update"
    a = _arr(fn, "a", a)
    z_old, q = _like(fn, "z_old", z_old, a), _like(fn, "q", q, a)
    out = V.out_like(fn, "out", out, a)
    for arr, nm in ((a, "a"), (z_old, "z_old"), (q, "q")):
        V.exact_alias(fn, "out", out, arr, nm)
    _z_update(_flat(a), _flat(z_old), _flat(q), _flat(out), _bounds(a.size))
    return out


def z_step(z, r, q):
    """Local. In place: ``a = z - r``; ``z <- z_update(a, z, q)``; ``r <- z_new - a``. Returns z."""
    fn = "z_step"
    z = _writable(fn, "z", _arr(fn, "z", z))
    r = _writable(fn, "r", _like(fn, "r", r, z))
    q = _like(fn, "q", q, z)
    _z_step(_flat(z), _flat(r), _flat(q), _bounds(z.size))
    return z


def z_step_dual(z, r, q, nu):
    """Local. :func:`z_step`, and ``q <- nu (q - relu(z_old))`` in the same pass. Returns z.

    For the unquantised q update the dual is implicit: after every q/u update
    ``u = nu (q - relu z)`` holds exactly (``u_new = u + rho (p - q_new)`` with
    ``(nu + rho) q_new = nu relu z + rho p + u``), so u need not be stored.
    This kernel leaves that u in q's buffer for :func:`q_update` (called with
    ``u = q`` and ``out = q``), because z_old is gone once z is updated.
    """
    fn = "z_step_dual"
    z = _writable(fn, "z", _arr(fn, "z", z))
    r = _writable(fn, "r", _like(fn, "r", r, z))
    q = _writable(fn, "q", _like(fn, "q", q, z))
    nu = V.scalar(fn, "nu", nu, lo=0.0, lo_open=True)
    _z_step_dual(_flat(z), _flat(r), _flat(q), nu, _bounds(z.size))
    return z


def q_update(z, p_next, u, nu, rho, out=None):
    """Local. ``q = (nu relu(z) + rho p_next + u) / (nu + rho)`` elementwise (float64 inside)."""
    fn = "q_update"
    z = _arr(fn, "z", z)
    p_next, u = _like(fn, "p_next", p_next, z), _like(fn, "u", u, z)
    nu = V.scalar(fn, "nu", nu, lo=0.0, lo_open=True)
    rho = V.scalar(fn, "rho", rho, lo=0.0, lo_open=True)
    out = V.out_like(fn, "out", out, z)
    for arr, nm in ((z, "z"), (p_next, "p_next"), (u, "u")):
        V.exact_alias(fn, "out", out, arr, nm)
    _q_update(_flat(z), _flat(p_next), _flat(u), nu, rho, _flat(out), _bounds(z.size))
    return out


def u_update(u, p_next, q, rho):
    """Local. In place ``u <- u + rho (p_next - q)`` (float64 inside). Returns ``u``.

    When both neighbours of a layer boundary call this with the same (exchanged)
    operands, their copies of ``u`` stay bitwise equal.
    """
    fn = "u_update"
    u = _writable(fn, "u", _arr(fn, "u", u))
    p_next, q = _like(fn, "p_next", p_next, u), _like(fn, "q", q, u)
    rho = V.scalar(fn, "rho", rho, lo=0.0, lo_open=True)
    _u_update(_flat(u), _flat(p_next), _flat(q), rho, _bounds(u.size))
    return u


def axpy(y, x, c):
    """Local. In place ``y <- y + c x`` (float64 inside). Returns ``y``."""
    fn = "axpy"
    y = _writable(fn, "y", _arr(fn, "y", y))
    x = _like(fn, "x", x, y)
    _axpy(_flat(y), _flat(x), V.scalar(fn, "c", c), _bounds(y.size))
    return y


def p_grad(g, p, q_prev, u_prev, nu, rho):
    """Local. In place ``g <- -nu g + u_prev + rho (p - q_prev)``.

    With ``g = R W`` on entry (R = z - p W^T - b) this is the gradient of
    (nu/2)||z - p W^T - b||^2 + <u_prev, p - q_prev> + (rho/2)||p - q_prev||^2.
    """
    fn = "p_grad"
    g = _writable(fn, "g", _arr(fn, "g", g))
    p, q_prev, u_prev = (_like(fn, n, x, g) for n, x in (("p", p), ("q_prev", q_prev), ("u_prev", u_prev)))
    nu = V.scalar(fn, "nu", nu, lo=0.0, lo_open=True)
    rho = V.scalar(fn, "rho", rho, lo=0.0, lo_open=True)
    _p_grad(_flat(g), _flat(p), _flat(q_prev), _flat(u_prev), nu, rho, _bounds(g.size))
    return g


def p_grad_dual(g, p, q_prev, z_prev, nu, rho):
    """Local. :func:`p_grad` with the implicit dual ``u_prev = nu (q_prev - relu(z_prev))``.

    In place ``g <- -nu g + nu (q_prev - relu z_prev) + rho (p - q_prev)`` (see
    :func:`z_step_dual` for why u_prev has that value).
    """
    fn = "p_grad_dual"
    g = _writable(fn, "g", _arr(fn, "g", g))
    p, q_prev, z_prev = (_like(fn, n, x, g) for n, x in (("p", p), ("q_prev", q_prev), ("z_prev", z_prev)))
    nu = V.scalar(fn, "nu", nu, lo=0.0, lo_open=True)
    rho = V.scalar(fn, "rho", rho, lo=0.0, lo_open=True)
    _p_grad_dual(_flat(g), _flat(p), _flat(q_prev), _flat(z_prev), nu, rho, _bounds(g.size))
    return g


def sumsq(x):
    """Local. ``sum(x**2)`` accumulated in float64 (64 block partials in order)."""
    x = _arr("sumsq", "x", x)
    return float(_sumsq(_flat(x), _bounds(x.size)))


def center_columns(r, b):
    """Local. ``m = mean over rows of r``; ``b += m``; ``r -= m`` (in place). Returns m (float64).

    This is the exact b update: b_new = mean(z - p W^T) = b + mean(R), and the
    residual R = z - p W^T - b_new becomes R - m.
    """
    fn = "center_columns"
    r = _writable(fn, "r", _arr(fn, "r", r, ndim=2))
    b = _writable(fn, "b", _arr(fn, "b", b, r.dtype, ndim=1))
    if b.shape[0] != r.shape[1]:
        raise ValueError(f"{fn}: b has {b.shape[0]} entries, r has {r.shape[1]} columns")
    if r.shape[0] == 0:
        raise ValueError(f"{fn}: r has no rows")
    return _center_columns(r, b, _bounds(r.shape[0]))


def resid_refresh(r, z, b):
    """Local. In place ``r <- z - b - r`` (r holds p W^T on entry). Returns r."""
    fn = "resid_refresh"
    r = _writable(fn, "r", _arr(fn, "r", r, ndim=2))
    z = _like(fn, "z", z, r)
    b = _arr(fn, "b", b, r.dtype, ndim=1)
    if b.shape[0] != r.shape[1]:
        raise ValueError(f"{fn}: b has {b.shape[0]} entries, r has {r.shape[1]} columns")
    _resid_refresh(r, z, b, _bounds(r.shape[0]))
    return r


def backtrack(gg, ghg, tau0, max_doublings, eta=2.0):
    """Local. Bounded backtracking on the curvature t of a quadratic's gradient step.

    ``gg = ||g||^2``, ``ghg = g^T H g`` (the quadratic's curvature along g).
    Tries t = tau0, eta tau0, ..., eta^max_doublings tau0 and returns
    ``(t, doublings, accepted)`` for the first t with f(x - g/t) <= f(x) -
    ||g||^2/(2t); ``accepted`` is False when none passed (then t is the last tried
    and the caller must not move).
    """
    fn = "backtrack"
    gg = V.scalar(fn, "gg", gg, lo=0.0)
    ghg = V.scalar(fn, "ghg", ghg)
    tau0 = V.scalar(fn, "tau0", tau0, lo=0.0, lo_open=True)
    eta = V.scalar(fn, "eta", eta, lo=1.0, lo_open=True)
    md = V.count(fn, "max_doublings", max_doublings, 0)
    t, k, ok = _backtrack(gg, ghg, tau0, eta, md)
    return float(t), int(k), bool(ok)


def ce_prox(a, y, z0, nu, step, max_iter, tol, out=None, ce=None):
    """Local. Row-wise bounded FISTA for argmin_z CE(z; y) + (nu/2)||z - a||^2 (module docstring).

    ``a``, ``z0``: (N, C) float; ``y``: (N,) int labels in [0, C); ``step`` in
    (0, 2] (softmax-CE has curvature <= 1/2); ``out`` may alias ``z0``.
    Returns ``(out, ce, iters)``: ``ce[i]`` = CE(out_i; y_i) (float64) and the
    largest number of FISTA steps any row used.
    """
    fn = "ce_prox"
    a = _arr(fn, "a", a, ndim=2)
    z0 = _like(fn, "z0", z0, a)
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != a.shape[0] or y.dtype.kind not in "iu":
        raise ValueError(f"{fn}: y must be 1-D integer labels of length {a.shape[0]}")
    if a.shape[1] < 1:
        raise ValueError(f"{fn}: a needs at least one column")
    if y.size and (y.min() < 0 or y.max() >= a.shape[1]):
        raise ValueError(f"{fn}: labels must lie in [0, {a.shape[1]})")
    nu = V.scalar(fn, "nu", nu, lo=0.0, lo_open=True)
    step = V.scalar(fn, "step", step, lo=0.0, lo_open=True)
    if step > 2.0:
        raise ValueError(f"{fn}: step must be <= 2 (1 / curvature bound of softmax CE), got {step}")
    max_iter = V.count(fn, "max_iter", max_iter, 0)
    tol = V.scalar(fn, "tol", tol, lo=0.0)
    out = V.out_like(fn, "out", out, a)
    V.exact_alias(fn, "out", out, z0, "z0")
    if ce is None:
        ce = np.empty(a.shape[0])
    elif ce.shape != (a.shape[0],) or ce.dtype != np.float64:
        raise ValueError(f"{fn}: ce must be float64 of shape ({a.shape[0]},)")
    if a.shape[0] == 0:
        return out, ce, 0
    its = _ce_prox(a, y.astype(np.int64, copy=False), z0, nu, step, max_iter, tol, out, ce,
                   _bounds(a.shape[0]))
    return out, ce, int(its)
