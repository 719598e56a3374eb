"""NEXT local surrogate solves (ALGORITHMS.md section 1, step 1 and 2).

Agent i at iteration k solves the strongly convex problem (the local
optimisation step of NEXT, Di Lorenzo & Scutari, arXiv 1602.00591; its use
for neural networks, Scardapane & Di Lorenzo, arXiv 1610.07448)

    w~ = argmin_w  g~(w; w_i) + pi^T (w - w_i) + r(w),   z = w_i + alpha (w~ - w_i)

with r(w) = lam ||w||_1 (reg "l1"), lam ||w||^2 ("l2") or 0 ("none").

Full linearisation, g~ = grad^T (w - w_i) + (tau/2) ||w - w_i||^2, has the
elementwise closed forms (g = grad g_i(w_i))

    none: w~ = w_i - (g + pi) / tau
    l2:   w~ = (tau w_i - g - pi) / (tau + 2 lam)
    l1:   w~ = soft_threshold(w_i - (g + pi) / tau, lam / tau)

:func:`linearized_step` fuses the closed form with the step z in one pass
(reads w, g, pi; writes w~, z: 5 streams instead of 7).  The problem is
separable per coordinate, so the block-parallel version
(:func:`linearized_step_blocks`, ``numba.prange`` over C contiguous blocks)
computes exactly the same numbers as the serial one.

Partial linearisation for the squared loss (Gauss-Newton / Levenberg-
Marquardt; the partial-linearisation surrogate of arXiv 1610.07448): with J
the (m x d) Jacobian of the network outputs at w_i (m = samples x outputs
rows), r = f(w_i) - y and the normalisation

    g_i(w) = 1/(2 m') sum_s ||f(x_s; w) - y_s||^2,   m' = n_samples   (not m)

(the mean over samples of the squared error summed over outputs; torch's
``MSELoss(reduction="sum") / batch``), grad g_i(w_i) = J^T r / m' and

    g~(w; w_i) = 1/(2 m') ||r + J d||^2 + (tau/2) ||d||^2,   d = w - w_i.

    none/l2: (J^T J / m' + (tau + 2 lam) I) d = -(J^T r / m' + pi + 2 lam w_i)
             solved by conjugate gradients from d = 0, stopped when
             ||residual|| <= tol ||rhs|| or after max_iter matvecs.
    l1:      accelerated proximal gradient (FISTA with the constant momentum
             (sqrt L - sqrt tau)/(sqrt L + sqrt tau) of a tau-strongly convex
             objective) from w_i, step 1/L with L = tau + sigma^2 / m';
             sigma^2 = min(1.1 * power_iteration(J^T J, 30 steps), ||J||_F^2)
             (||J||_F^2 is a guaranteed bound, the power estimate a tight one
             with a 10% margin).  Stopped when the prox-gradient mapping
             ||G(y_k)|| = L ||y_k - w_{k+1}|| <= tol ||G(w_i)|| or after
             max_iter steps.
    Iterations used are returned.  Work vectors are float64 whatever J's
    dtype (J may be float32 to halve its memory traffic); w~ has w's dtype.

Block-parallel Gauss-Newton.  J^T J couples all coordinates, so the full GN
quadratic is NOT block-separable unless J is block-diagonal.  We choose the
block-Jacobi surrogate: for C contiguous column blocks b (J = [J_1 ... J_C]),

    g~_B(w; w_i) = sum_b [ 1/(2 m') ||r + J_b d_b||^2 + (tau/2) ||d_b||^2 ],

i.e. each block keeps the Gauss-Newton curvature of its own columns and the
other blocks frozen at w_i (the cross terms J_b^T J_c, b != c, are dropped).
It is still a valid NEXT surrogate (tau-strongly convex, Lipschitz gradient,
and grad g~_B(w_i; w_i) = J^T r / m' = grad g_i(w_i): gradient consistency),
and it is exactly the block-separable "parallel" surrogate family of NEXT
(arXiv 1602.00591), so the C solves are independent and run under
``numba.prange``.  It is NOT the same w~ as the full GN solve for C > 1
(it is for C = 1, bitwise); the outer NEXT iteration converges either way
but the per-iteration progress of the block-Jacobi surrogate is that of a
less curvature-aware model.  ``gn_solve_blocks`` with C blocks equals C
independent ``gn_solve`` calls on the column blocks, bitwise.

Thread count: the caller's business (:func:`mpidl.kernels.set_threads`).
NumPy twins: ``tests/reference/surrogate_kernels.py``.
"""
import math

import numba
import numpy as np

from . import _validate as V
from ._blas import row_dot
from ._flags import JIT, PJIT
from .prox import _st
from .threads import block_bounds

__all__ = ["linearized_solve", "linearized_step", "linearized_step_blocks", "relax",
           "gn_solve", "gn_solve_blocks", "POWER_ITERS", "POWER_MARGIN"]

POWER_ITERS = 30
"""Power-iteration steps for the estimate of ||J_b||_2^2 (l1 Gauss-Newton)."""
POWER_MARGIN = 1.1
"""Safety factor on the power estimate, capped by ||J_b||_F^2."""


# ----------------------------------------------------------------------------------------
# full linearisation
# ----------------------------------------------------------------------------------------
@numba.njit(inline="always", **JIT)
def _wt(code, wp, gp, pp, tau, inv_tau, thr, inv_l2):
    """Closed form for one coordinate (scalars only: inlining it costs nothing)."""
    if code == 1:
        return _st(wp - (gp + pp) * inv_tau, thr)
    if code == 2:
        return (tau * wp - gp - pp) * inv_l2
    return wp - (gp + pp) * inv_tau


# Three kernels (w~ and z / w~ only / z only) with one loop per regularizer and no
# conditional store in any loop: with `if write: out[p] = ...` inside the loop
# LLVM neither unswitched nor vectorised it (measured 4x slower).
@numba.njit(**JIT)
def _lin_both(w, g, pi, tau, alpha, code, lam, out_wt, out_z):
    inv_tau = (tau / tau) / tau
    thr = lam * inv_tau
    inv_l2 = (tau / tau) / (tau + (lam + lam))
    if code == 1:
        for p in range(w.shape[0]):
            wp = w[p]
            wt = _wt(1, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2)
            out_wt[p] = wt
            out_z[p] = wp + alpha * (wt - wp)
    elif code == 2:
        for p in range(w.shape[0]):
            wp = w[p]
            wt = _wt(2, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2)
            out_wt[p] = wt
            out_z[p] = wp + alpha * (wt - wp)
    else:
        for p in range(w.shape[0]):
            wp = w[p]
            wt = _wt(0, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2)
            out_wt[p] = wt
            out_z[p] = wp + alpha * (wt - wp)


@numba.njit(**JIT)
def _lin_wt(w, g, pi, tau, code, lam, out):
    inv_tau = (tau / tau) / tau
    thr = lam * inv_tau
    inv_l2 = (tau / tau) / (tau + (lam + lam))
    if code == 1:
        for p in range(w.shape[0]):
            out[p] = _wt(1, w[p], g[p], pi[p], tau, inv_tau, thr, inv_l2)
    elif code == 2:
        for p in range(w.shape[0]):
            out[p] = _wt(2, w[p], g[p], pi[p], tau, inv_tau, thr, inv_l2)
    else:
        for p in range(w.shape[0]):
            out[p] = _wt(0, w[p], g[p], pi[p], tau, inv_tau, thr, inv_l2)


@numba.njit(**JIT)
def _lin_z(w, g, pi, tau, alpha, code, lam, out):
    inv_tau = (tau / tau) / tau
    thr = lam * inv_tau
    inv_l2 = (tau / tau) / (tau + (lam + lam))
    if code == 1:
        for p in range(w.shape[0]):
            wp = w[p]
            out[p] = wp + alpha * (_wt(1, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2) - wp)
    elif code == 2:
        for p in range(w.shape[0]):
            wp = w[p]
            out[p] = wp + alpha * (_wt(2, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2) - wp)
    else:
        for p in range(w.shape[0]):
            wp = w[p]
            out[p] = wp + alpha * (_wt(0, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2) - wp)


@numba.njit(**JIT)
def _lin_wt_inplace(w, g, pi, tau, code, lam):
    inv_tau = (tau / tau) / tau
    thr = lam * inv_tau
    inv_l2 = (tau / tau) / (tau + (lam + lam))
    if code == 1:
        for p in range(w.shape[0]):
            w[p] = _wt(1, w[p], g[p], pi[p], tau, inv_tau, thr, inv_l2)
    elif code == 2:
        for p in range(w.shape[0]):
            w[p] = _wt(2, w[p], g[p], pi[p], tau, inv_tau, thr, inv_l2)
    else:
        for p in range(w.shape[0]):
            w[p] = _wt(0, w[p], g[p], pi[p], tau, inv_tau, thr, inv_l2)


@numba.njit(**JIT)
def _lin_z_inplace(w, g, pi, tau, alpha, code, lam):
    inv_tau = (tau / tau) / tau
    thr = lam * inv_tau
    inv_l2 = (tau / tau) / (tau + (lam + lam))
    if code == 1:
        for p in range(w.shape[0]):
            wp = w[p]
            w[p] = wp + alpha * (_wt(1, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2) - wp)
    elif code == 2:
        for p in range(w.shape[0]):
            wp = w[p]
            w[p] = wp + alpha * (_wt(2, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2) - wp)
    else:
        for p in range(w.shape[0]):
            wp = w[p]
            w[p] = wp + alpha * (_wt(0, wp, g[p], pi[p], tau, inv_tau, thr, inv_l2) - wp)


@numba.njit(**JIT)
def _lin(w, g, pi, tau, alpha, code, lam, mode, out_wt, out_z):
    """mode 3: w~ and z; 1: w~ only (into out_wt); 2: z only (into out_z);
    4: w~ only, written over w; 5: z only, written over w.

    Per element, w[p], g[p], pi[p] are read before out_wt[p] / out_z[p] are
    written, so the outputs may alias any input exactly.  Modes 4 and 5 are
    one-array kernels for the common in-place calls: with out == w passed as
    two arrays LLVM's runtime alias check fails and the loop runs scalar
    (measured 2.5x slower).
    """
    if mode == 3:
        _lin_both(w, g, pi, tau, alpha, code, lam, out_wt, out_z)
    elif mode == 1:
        _lin_wt(w, g, pi, tau, code, lam, out_wt)
    elif mode == 2:
        _lin_z(w, g, pi, tau, alpha, code, lam, out_z)
    elif mode == 4:
        _lin_wt_inplace(w, g, pi, tau, code, lam)
    else:
        _lin_z_inplace(w, g, pi, tau, alpha, code, lam)


def _mode(w, out_wt, out_z, want_wt):
    """Kernel mode for these outputs (see _lin); aliasing was validated already."""
    if not want_wt:
        return 4 if V.exact_alias("", "", out_wt, w, "") else 1
    if out_wt is out_z:
        return 5 if V.exact_alias("", "", out_z, w, "") else 2
    return 3


@numba.njit(**PJIT)
def _lin_blocks(w, g, pi, tau, alpha, code, lam, mode, out_wt, out_z, bounds):
    for c in numba.prange(bounds.shape[0] - 1):
        lo = bounds[c]
        hi = bounds[c + 1]
        _lin(w[lo:hi], g[lo:hi], pi[lo:hi], tau, alpha, code, lam, mode, out_wt[lo:hi],
             out_z[lo:hi])


@numba.njit(**JIT)
def _relax(w, wt, alpha, out):
    for p in range(w.shape[0]):
        wp = w[p]
        out[p] = wp + alpha * (wt[p] - wp)
    return out


def _lin_args(fn, w, g, pi, tau, alpha, reg, lam):
    code = V.reg_code(fn, reg)
    w = V.vector(fn, "w", w)
    g = V.vector(fn, "g", g, w.dtype)
    pi = V.vector(fn, "pi", pi, w.dtype)
    V.same_shape(fn, "g", g, w)
    V.same_shape(fn, "pi", pi, w)
    dt = w.dtype.type
    tau = dt(V.scalar(fn, "tau", tau, lo=0.0, lo_open=True))
    alpha = dt(V.scalar(fn, "alpha", alpha))
    lam = dt(V.scalar(fn, "lam", lam, lo=0.0))
    return w, g, pi, tau, alpha, code, lam


def _check_alias(fn, w, g, pi, out_wt, out_z):
    """Outputs may alias inputs (and each other) exactly, never partially."""
    for oname, o in (("out_wt", out_wt), ("out_z", out_z)):
        for iname, a in (("w", w), ("g", g), ("pi", pi)):
            V.exact_alias(fn, oname, o, a, iname)
    V.exact_alias(fn, "out_z", out_z, out_wt, "out_wt")


def linearized_step(w, g, pi, tau, alpha, reg, lam, out_wt=None, out_z=None):
    """Local. Fused NEXT full-linearisation solve and step, one pass over memory.

    ``w~ = argmin_v (g + pi)^T (v - w) + (tau/2)||v - w||^2 + r(v)`` (closed
    forms in the module docstring) and ``z = w + alpha (w~ - w)``.
    ``w, g, pi``: 1-D, one float dtype; ``tau > 0``; ``lam >= 0``;
    ``reg`` in {"none", "l1", "l2"}.  Scalars are rounded to w's dtype.
    ``out_wt``/``out_z`` may alias any input; passing the same array object
    for both writes only z into it (use this when only z is needed: one write
    stream fewer).
    Returns ``(out_wt, out_z)``.
    """
    fn = "linearized_step"
    w, g, pi, tau, alpha, code, lam = _lin_args(fn, w, g, pi, tau, alpha, reg, lam)
    out_wt = V.out_like(fn, "out_wt", out_wt, w)
    out_z = V.out_like(fn, "out_z", out_z, w)
    _check_alias(fn, w, g, pi, out_wt, out_z)
    _lin(w, g, pi, tau, alpha, code, lam, _mode(w, out_wt, out_z, True), out_wt, out_z)
    return out_wt, out_z


def linearized_solve(w, g, pi, tau, reg, lam, out=None):
    """Local. NEXT full-linearisation closed form ``w~`` alone (no step, one write stream).

    Same arguments and rules as :func:`linearized_step`; ``out`` may alias an input.
    """
    fn = "linearized_solve"
    w, g, pi, tau, alpha, code, lam = _lin_args(fn, w, g, pi, tau, 1.0, reg, lam)
    out = V.out_like(fn, "out", out, w)
    _check_alias(fn, w, g, pi, out, out)
    _lin(w, g, pi, tau, alpha, code, lam, _mode(w, out, out, False), out, out)
    return out


def linearized_step_blocks(w, g, pi, tau, alpha, reg, lam, n_blocks, out_wt=None, out_z=None):
    """Local. :func:`linearized_step` with ``numba.prange`` over ``n_blocks`` contiguous blocks.

    The closed form is separable per coordinate, so the result equals the
    serial kernel's bitwise for every block count and thread count.  Blocks
    follow :func:`mpidl.kernels.block_bounds`.
    """
    fn = "linearized_step_blocks"
    w, g, pi, tau, alpha, code, lam = _lin_args(fn, w, g, pi, tau, alpha, reg, lam)
    n_blocks = V.count(fn, "n_blocks", n_blocks, 1)
    out_wt = V.out_like(fn, "out_wt", out_wt, w)
    out_z = V.out_like(fn, "out_z", out_z, w)
    _check_alias(fn, w, g, pi, out_wt, out_z)
    _lin_blocks(w, g, pi, tau, alpha, code, lam, _mode(w, out_wt, out_z, True), out_wt, out_z,
                block_bounds(w.shape[0], n_blocks))
    return out_wt, out_z


def relax(w, wt, alpha, out=None):
    """Local. NEXT step ``z = w + alpha (w~ - w)`` (for w~ from a Gauss-Newton solve).

    ``out`` may alias ``w`` or ``wt``.  Returns ``out``.
    """
    w = V.vector("relax", "w", w)
    wt = V.vector("relax", "wt", wt, w.dtype)
    V.same_shape("relax", "wt", wt, w)
    alpha = w.dtype.type(V.scalar("relax", "alpha", alpha))
    out = V.out_like("relax", "out", out, w)
    V.exact_alias("relax", "out", out, w, "w")
    V.exact_alias("relax", "out", out, wt, "wt")
    return _relax(w, wt, alpha, out)


# ----------------------------------------------------------------------------------------
# partial linearisation (Gauss-Newton) for the squared loss
# ----------------------------------------------------------------------------------------
@numba.njit(**JIT)
def _normal_matvec(J, v, shift, r, scale, out):
    """out = scale * J^T (shift * r + J v), one pass over the rows of J (a column block view).

    shift is 0.0 (pure J^T J v) or 1.0 (the residual r + J v of the GN model).
    """
    n = v.shape[0]
    for j in range(n):
        out[j] = 0.0
    for i in range(J.shape[0]):
        t = scale * (shift * r[i] + row_dot(J, i, v))
        for j in range(n):
            out[j] += t * J[i, j]


@numba.njit(**JIT)
def _dot(a, b):
    s = 0.0
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


@numba.njit(**JIT)
def _gn_cg(w, J, r, pi, c, lam2, inv_m, max_iter, tol, out):
    """CG on (J^T J / m' + c I) d = -(J^T r / m' + pi + lam2 w); out = w + d (block arrays)."""
    n = w.shape[0]
    x = np.zeros(n)
    res = np.empty(n)
    p = np.empty(n)
    ap = np.empty(n)
    _normal_matvec(J, x, 1.0, r, inv_m, res)            # J^T r / m'  (x = 0)
    for j in range(n):
        res[j] = -(res[j] + pi[j] + lam2 * w[j])
        p[j] = res[j]
    rs = _dot(res, res)
    thr = tol * tol * rs
    it = 0
    while it < max_iter and rs > thr:
        _normal_matvec(J, p, 0.0, r, inv_m, ap)
        pap = 0.0
        for j in range(n):
            ap[j] += c * p[j]
            pap += p[j] * ap[j]
        if not pap > 0.0:          # breakdown (cannot happen for c > 0 in exact arithmetic)
            break
        a = rs / pap
        for j in range(n):
            x[j] += a * p[j]
            res[j] -= a * ap[j]
        rs_new = _dot(res, res)
        beta = rs_new / rs
        for j in range(n):
            p[j] = res[j] + beta * p[j]
        rs = rs_new
        it += 1
    for j in range(n):
        out[j] = w[j] + x[j]
    return it


@numba.njit(**JIT)
def _power_bound(J, r, n_iter, margin):
    """min(margin * power estimate of ||J||_2^2, ||J||_F^2)."""
    n = J.shape[1]
    fro = 0.0
    for i in range(J.shape[0]):
        for j in range(n):
            fro += J[i, j] * J[i, j]
    v = np.empty(n)
    u = np.empty(n)
    for j in range(n):
        f = (j + 1) * 0.6180339887498949
        v[j] = 1.0 + (f - math.floor(f))             # deterministic start, no zeros
    nv = math.sqrt(_dot(v, v))
    for j in range(n):
        v[j] /= nv
    est = 0.0
    for _ in range(n_iter):
        _normal_matvec(J, v, 0.0, r, 1.0, u)         # r unused (shift 0)
        est = math.sqrt(_dot(u, u))                  # ||J^T J v||, v unit: <= lambda_max
        if est == 0.0:
            break
        for j in range(n):
            v[j] = u[j] / est
    return min(margin * est, fro)


@numba.njit(**JIT)
def _gn_fista(w, J, r, pi, tau, lam, inv_m, max_iter, tol, power_iters, margin, out):
    """Strongly convex FISTA on 1/(2m')||r + J d||^2 + pi^T d + tau/2||d||^2 + lam||w + d||_1."""
    n = w.shape[0]
    big_l = tau + inv_m * _power_bound(J, r, power_iters, margin)
    step = 1.0 / big_l
    thr_l1 = lam * step
    q = math.sqrt(tau / big_l)
    beta = (1.0 - q) / (1.0 + q)
    x = np.empty(n)
    y = np.empty(n)
    d = np.empty(n)
    grad = np.empty(n)
    for j in range(n):
        x[j] = w[j]
        y[j] = x[j]
    thr = 0.0
    it = 0
    while it < max_iter:
        for j in range(n):
            d[j] = y[j] - w[j]
        _normal_matvec(J, d, 1.0, r, inv_m, grad)      # J^T (r + J d) / m'
        g2 = 0.0
        for j in range(n):
            xn = _st(y[j] - step * (grad[j] + pi[j] + tau * d[j]), thr_l1)
            e = y[j] - xn
            g2 += e * e
            d[j] = xn                  # d now holds x_{k+1}
        g2 *= big_l * big_l             # ||G(y_k)||^2
        if it == 0:
            thr = tol * tol * g2
        it += 1
        if g2 <= thr:
            for j in range(n):
                x[j] = d[j]
            break
        for j in range(n):
            xn = d[j]
            y[j] = xn + beta * (xn - x[j])
            x[j] = xn
    for j in range(n):
        out[j] = x[j]
    return it


@numba.njit(**JIT)
def _gn(w, J, r, pi, tau, code, lam, inv_m, max_iter, tol, power_iters, margin, out):
    """One Gauss-Newton surrogate solve on (block) arrays w, J (m x n), pi, out."""
    if code == 1:
        return _gn_fista(w, J, r, pi, tau, lam, inv_m, max_iter, tol, power_iters, margin, out)
    lam2 = 2.0 * lam if code == 2 else 0.0
    return _gn_cg(w, J, r, pi, tau + lam2, lam2, inv_m, max_iter, tol, out)


@numba.njit(**PJIT)
def _gn_blocks(w, J, r, pi, tau, code, lam, inv_m, max_iter, tol, power_iters, margin, out,
               bounds, iters):
    for c in numba.prange(bounds.shape[0] - 1):
        lo = bounds[c]
        hi = bounds[c + 1]
        iters[c] = _gn(w[lo:hi], J[:, lo:hi], r, pi[lo:hi], tau, code, lam, inv_m, max_iter, tol,
                       power_iters, margin, out[lo:hi])


def _gn_args(fn, w, J, r, pi, tau, reg, lam, n_samples, max_iter, tol, out):
    code = V.reg_code(fn, reg)
    w = V.vector(fn, "w", w)
    J = np.asarray(J)
    if J.ndim != 2 or J.shape[1] != w.shape[0]:
        raise ValueError(f"{fn}: J must have shape (m, {w.shape[0]}), got {J.shape}")
    if J.dtype not in V.FLOATS:
        raise TypeError(f"{fn}: J must have dtype float32 or float64, got {J.dtype}")
    r = V.vector(fn, "r", r, J.dtype)
    if r.shape != (J.shape[0],):
        raise ValueError(f"{fn}: r must have shape ({J.shape[0]},), got {r.shape}")
    pi = V.vector(fn, "pi", pi, w.dtype)
    V.same_shape(fn, "pi", pi, w)
    tau = V.scalar(fn, "tau", tau, lo=0.0, lo_open=True)
    lam = V.scalar(fn, "lam", lam, lo=0.0)
    n_samples = V.count(fn, "n_samples", n_samples, 1)
    max_iter = V.count(fn, "max_iter", max_iter, 0)
    tol = V.scalar(fn, "tol", tol, lo=0.0)
    out = V.out_like(fn, "out", out, w)
    if np.shares_memory(out, w) or np.shares_memory(out, pi):
        raise ValueError(f"{fn}: out must not overlap w or pi (they are read until the end)")
    return w, J, r, pi, tau, code, lam, 1.0 / n_samples, max_iter, tol, out


def gn_solve(w, J, r, pi, tau, reg, lam, n_samples, max_iter=100, tol=1e-10, out=None):
    """Local. Gauss-Newton (partial linearisation) surrogate solve of NEXT for the squared loss.

    ``w~ = argmin_v 1/(2 m')||r + J (v - w)||^2 + pi^T (v - w) + (tau/2)||v - w||^2 + r(v)``
    with ``m' = n_samples`` (see the module docstring for the normalisation,
    the CG / FISTA inner loops and their stopping rules).  ``w, pi``: (d,),
    one float dtype; ``J``: (m, d), ``r``: (m,), float32 or float64 (may
    differ from w's); ``max_iter >= 0``; ``tol >= 0`` relative.  ``out`` must
    not overlap ``w`` or ``pi``.  Returns ``(out, iterations)``.
    """
    w, J, r, pi, tau, code, lam, inv_m, max_iter, tol, out = _gn_args(
        "gn_solve", w, J, r, pi, tau, reg, lam, n_samples, max_iter, tol, out)
    it = _gn(w, J, r, pi, tau, code, lam, inv_m, max_iter, tol, POWER_ITERS, POWER_MARGIN, out)
    return out, int(it)


def gn_solve_blocks(w, J, r, pi, tau, reg, lam, n_samples, n_blocks, max_iter=100, tol=1e-10,
                    out=None):
    """Local. Block-Jacobi Gauss-Newton surrogate: ``n_blocks`` independent column-block solves.

    Block b solves the :func:`gn_solve` problem in its own coordinates with
    ``J_b = J[:, b]`` and the other blocks frozen at ``w`` (cross-curvature
    dropped; a valid block-separable NEXT surrogate, see the module
    docstring), under ``numba.prange``.  Equals ``gn_solve`` on each column
    block, bitwise; equals ``gn_solve`` for ``n_blocks == 1``.
    Returns ``(out, iterations)`` with ``iterations`` an int64 array (C,).
    """
    fn = "gn_solve_blocks"
    w, J, r, pi, tau, code, lam, inv_m, max_iter, tol, out = _gn_args(
        fn, w, J, r, pi, tau, reg, lam, n_samples, max_iter, tol, out)
    n_blocks = V.count(fn, "n_blocks", n_blocks, 1)
    bounds = block_bounds(w.shape[0], n_blocks)
    iters = np.zeros(bounds.shape[0] - 1, dtype=np.int64)
    _gn_blocks(w, J, r, pi, tau, code, lam, inv_m, max_iter, tol, POWER_ITERS, POWER_MARGIN, out,
               bounds, iters)
    return out, iters
