"""mpidl.kernels.surrogate against its NumPy twin, plus surrogate optimality properties."""
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpidl import kernels
from reference import surrogate_kernels as ref

DTYPES = [np.float32, np.float64]
REGS = ["none", "l1", "l2"]
TOL = {np.float32: 3e-6, np.float64: 1e-13}


def _wgp(n, dtype, seed=0):
    w, g, pi = np.random.default_rng(seed).standard_normal((3, n))
    return w.astype(dtype), g.astype(dtype), pi.astype(dtype)


@pytest.fixture
def two_threads():
    top = numba.config.NUMBA_NUM_THREADS
    yield kernels.set_threads(2)
    kernels.set_threads(top)


def _subgrad_residual(reg, lam, x, smooth_grad):
    """Distance from 0 to smooth_grad + lam * d r(x) (elementwise, inf-norm)."""
    if reg == "none":
        return np.abs(smooth_grad).max()
    if reg == "l2":
        return np.abs(smooth_grad + 2 * lam * x).max()
    nz = x != 0
    res = np.where(nz, np.abs(smooth_grad + lam * np.sign(x)),
                   np.maximum(np.abs(smooth_grad) - lam, 0.0))
    return res.max()


# ---------------------------------------------------------------- full linearisation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_linearized_step_matches_reference(dtype, reg, n):
    w, g, pi = _wgp(n, dtype, n)
    wt, z = kernels.linearized_step(w, g, pi, 1.7, 0.3, reg, 0.25)
    rwt, rz = ref.linearized_step(w, g, pi, 1.7, 0.3, reg, 0.25)
    assert wt.dtype == dtype and z.dtype == dtype
    np.testing.assert_allclose(wt, rwt, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(z, rz, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_array_equal(kernels.linearized_solve(w, g, pi, 1.7, reg, 0.25), wt)
    np.testing.assert_allclose(kernels.relax(w, wt, 0.3), ref.relax(w, rwt, 0.3),
                               rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("reg", REGS)
def test_linearized_step_aliasing(reg):
    w, g, pi = _wgp(37, np.float64, 1)
    wt, z = kernels.linearized_step(w, g, pi, 2.0, 0.6, reg, 0.1)
    # outputs into the inputs
    w2, g2, pi2 = w.copy(), g.copy(), pi.copy()
    a, b = kernels.linearized_step(w2, g2, pi2, 2.0, 0.6, reg, 0.1, out_wt=w2, out_z=g2)
    assert a is w2 and b is g2
    np.testing.assert_array_equal(w2, wt)
    np.testing.assert_array_equal(g2, z)
    # same array for both outputs: z only (also written over w, and block-parallel)
    o = np.full_like(w, np.nan)       # not empty_like: freed memory may already hold z
    kernels.linearized_step(w, g, pi, 2.0, 0.6, reg, 0.1, out_wt=o, out_z=o)
    np.testing.assert_array_equal(o, z)
    w4 = w.copy()
    kernels.linearized_step(w4, g, pi, 2.0, 0.6, reg, 0.1, out_wt=w4, out_z=w4)
    np.testing.assert_array_equal(w4, z)
    w5 = w.copy()
    kernels.linearized_step_blocks(w5, g, pi, 2.0, 0.6, reg, 0.1, 4, out_wt=w5, out_z=w5[:])
    np.testing.assert_array_equal(w5, z)
    w6 = w.copy()
    kernels.linearized_step_blocks(w6, g, pi, 2.0, 0.6, reg, 0.1, 3, out_wt=g2, out_z=w6)
    np.testing.assert_array_equal(w6, z)
    # relax and linearized_solve in place
    w3 = w.copy()
    kernels.linearized_solve(w3, g, pi, 2.0, reg, 0.1, out=w3)
    np.testing.assert_array_equal(w3, wt)
    kernels.relax(w, w3, 0.6, out=w3)
    np.testing.assert_array_equal(w3, z)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 50), seed=st.integers(0, 2**31), tau=st.floats(1e-2, 1e2),
       lam=st.floats(0.0, 5.0), reg=st.sampled_from(REGS))
def test_linearized_first_order_condition(n, seed, tau, lam, reg):
    """0 in g + pi + tau (w~ - w) + d r(w~): w~ minimises the linearised surrogate."""
    w, g, pi = _wgp(n, np.float64, seed)
    wt = kernels.linearized_solve(w, g, pi, tau, reg, lam)
    scale = 1 + np.abs(g + pi).max() + tau * np.abs(w).max() + lam
    assert _subgrad_residual(reg, lam, wt, g + pi + tau * (wt - w)) <= 1e-12 * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reg", REGS)
def test_linearized_blocks_equal_serial(dtype, reg, two_threads):
    n = 1003
    w, g, pi = _wgp(n, dtype, 5)
    wt, z = kernels.linearized_step(w, g, pi, 0.9, 0.5, reg, 0.2)
    for c in (1, 2, 3, 8, n, n + 5):
        for threads in (1, 2):
            kernels.set_threads(threads)
            bwt, bz = kernels.linearized_step_blocks(w, g, pi, 0.9, 0.5, reg, 0.2, c)
            np.testing.assert_array_equal(bwt, wt)
            np.testing.assert_array_equal(bz, z)
    rwt, rz = ref.linearized_step_blocks(w, g, pi, 0.9, 0.5, reg, 0.2, 3)
    np.testing.assert_allclose(bz, rz, rtol=TOL[dtype], atol=TOL[dtype])


def test_linearized_validates():
    w, g, pi = _wgp(5, np.float64)
    with pytest.raises(ValueError, match="tau"):
        kernels.linearized_step(w, g, pi, 0.0, 0.5, "l1", 0.1)
    with pytest.raises(ValueError, match="lam"):
        kernels.linearized_step(w, g, pi, 1.0, 0.5, "l1", -0.1)
    with pytest.raises(ValueError, match="reg"):
        kernels.linearized_step(w, g, pi, 1.0, 0.5, "L1", 0.1)
    with pytest.raises(ValueError, match="shape"):
        kernels.linearized_step(w, g[:4], pi, 1.0, 0.5, "l1", 0.1)
    with pytest.raises(TypeError, match="dtype"):
        kernels.linearized_step(w, g.astype(np.float32), pi, 1.0, 0.5, "l1", 0.1)
    with pytest.raises(ValueError, match="out_z"):
        kernels.linearized_step(w, g, pi, 1.0, 0.5, "l1", 0.1, out_z=np.zeros(6))
    with pytest.raises(ValueError, match="linearized_step_blocks: n_blocks"):
        kernels.linearized_step_blocks(w, g, pi, 1.0, 0.5, "l1", 0.1, 0)
    with pytest.raises(TypeError, match="dtype"):
        kernels.relax(w, w.astype(np.float32), 0.5)
    big = np.zeros(6)
    with pytest.raises(ValueError, match="partially overlaps"):
        kernels.linearized_step(big[1:], g, pi, 1.0, 0.5, "l1", 0.1, out_z=big[:-1])
    with pytest.raises(ValueError, match="partially overlaps"):
        kernels.relax(w, g, 0.5, out=g[::-1])


# ---------------------------------------------------------------- Gauss-Newton
def _gn_problem(m, d, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((m, d)).astype(dtype)
    r = rng.standard_normal(m).astype(dtype)
    w = rng.standard_normal(d).astype(dtype)
    pi = (0.1 * rng.standard_normal(d)).astype(dtype)
    return w, J, r, pi


def _gn_exact(w, J, r, pi, tau, reg, lam, ns):
    """Dense solve of the quadratic (none / l2)."""
    J = J.astype(np.float64)
    lam2 = 2 * lam if reg == "l2" else 0.0
    A = J.T @ J / ns + (tau + lam2) * np.eye(J.shape[1])
    d = np.linalg.solve(A, -(J.T @ r / ns + pi + lam2 * w))
    return w + d


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("m,d", [(1, 1), (12, 5), (40, 33), (9, 30)])
def test_gn_matches_reference(reg, m, d):
    w, J, r, pi = _gn_problem(m, d, seed=m + d)
    got, it = kernels.gn_solve(w, J, r, pi, 0.5, reg, 0.05, 4, max_iter=500, tol=1e-12)
    want, rit = ref.gn_solve(w, J, r, pi, 0.5, reg, 0.05, 4, max_iter=500, tol=1e-12)
    assert got.dtype == w.dtype
    assert abs(it - rit) <= 1 and 0 < it <= 500
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reg", ["none", "l2"])
def test_gn_cg_solves_normal_equations(reg):
    w, J, r, pi = _gn_problem(60, 25, seed=1)
    got, it = kernels.gn_solve(w, J, r, pi, 0.1, reg, 0.3, 6, max_iter=200, tol=1e-13)
    np.testing.assert_allclose(got, _gn_exact(w, J, r, pi, 0.1, reg, 0.3, 6), rtol=1e-10, atol=1e-10)
    assert it <= 25 + 2          # CG: at most d iterations in exact arithmetic


def test_gn_l1_optimality():
    w, J, r, pi = _gn_problem(50, 20, seed=2)
    tau, lam, ns = 0.2, 0.4, 5
    x, it = kernels.gn_solve(w, J, r, pi, tau, "l1", lam, ns, max_iter=5000, tol=1e-12)
    assert it < 5000
    smooth = J.T @ (r + J @ (x - w)) / ns + pi + tau * (x - w)
    assert _subgrad_residual("l1", lam, x, smooth) <= 1e-9
    assert np.count_nonzero(x == 0) > 0          # the l1 term is active somewhere


def test_gn_normalisation_matches_least_squares_oracle():
    """Linear model f(w) = Xw: the GN surrogate's gradient at w_i is grad of ||Xw - y||^2/(2 m')."""
    rng = np.random.default_rng(3)
    X, y, w = rng.standard_normal((30, 8)), rng.standard_normal(30), rng.standard_normal(8)
    pi = np.zeros(8)
    loss, grad = kernels.least_squares(w, X, y)
    # for a linear model the GN model is exact: the solution zeroes grad f + tau (x - w)
    x, _ = kernels.gn_solve(w, X, X @ w - y, pi, 0.3, "none", 0.0, 30, max_iter=100, tol=1e-14)
    _, gx = kernels.least_squares(x, X, y)
    np.testing.assert_allclose(gx + 0.3 * (x - w), 0, atol=1e-12)
    # and a tiny-iteration solve moves along -grad (first CG step is steepest descent)
    x1, it = kernels.gn_solve(w, X, X @ w - y, pi, 0.3, "none", 0.0, 30, max_iter=1)
    assert it == 1
    step = x1 - w
    np.testing.assert_allclose(step / np.linalg.norm(step), -grad / np.linalg.norm(grad), atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_gn_mixed_precision(reg):
    w, J, r, pi = _gn_problem(30, 11, seed=4)
    J32, r32, w32, pi32 = J.astype(np.float32), r.astype(np.float32), w.astype(np.float32), pi.astype(np.float32)
    got, _ = kernels.gn_solve(w32, J32, r32, pi32, 0.5, reg, 0.1, 3, max_iter=500, tol=1e-10)
    want, _ = ref.gn_solve(w32, J32, r32, pi32, 0.5, reg, 0.1, 3, max_iter=500, tol=1e-10)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got64, _ = kernels.gn_solve(w, J32, r32, pi, 0.5, reg, 0.1, 3, max_iter=500, tol=1e-10)
    assert got64.dtype == np.float64


@pytest.mark.parametrize("reg", REGS)
def test_gn_iterations_bounded(reg):
    w, J, r, pi = _gn_problem(40, 30, seed=5)
    x, it = kernels.gn_solve(w, J, r, pi, 0.01, reg, 0.1, 1, max_iter=3, tol=0.0)
    assert it == 3
    x, it = kernels.gn_solve(w, J, r, pi, 0.01, reg, 0.1, 1, max_iter=0)
    assert it == 0
    if reg != "l1":
        np.testing.assert_array_equal(x, w)
    # zero right-hand side / zero prox-gradient mapping: w is the solution, found at once
    z = np.zeros_like(w)
    x, it = kernels.gn_solve(z, J, np.zeros_like(r), z, 0.5, reg, 0.1, 1, max_iter=1000)
    assert it == (1 if reg == "l1" else 0)
    np.testing.assert_array_equal(x, z)


@pytest.mark.parametrize("reg", REGS)
def test_gn_blocks_equal_serial_per_block(reg, two_threads):
    w, J, r, pi = _gn_problem(25, 41, seed=6)
    one, it1 = kernels.gn_solve(w, J, r, pi, 0.7, reg, 0.05, 5, max_iter=300, tol=1e-11)
    b1, bit1 = kernels.gn_solve_blocks(w, J, r, pi, 0.7, reg, 0.05, 5, 1, max_iter=300, tol=1e-11)
    np.testing.assert_array_equal(b1, one)
    assert list(bit1) == [it1]
    for c in (2, 3, 41):
        bounds = kernels.block_bounds(41, c)
        serial = np.empty_like(w)
        its = []
        for b0, b1_ in zip(bounds[:-1], bounds[1:]):
            serial[b0:b1_], i = kernels.gn_solve(w[b0:b1_], J[:, b0:b1_], r, pi[b0:b1_], 0.7, reg,
                                                 0.05, 5, max_iter=300, tol=1e-11)
            its.append(i)
        for threads in (1, 2):
            kernels.set_threads(threads)
            par, pit = kernels.gn_solve_blocks(w, J, r, pi, 0.7, reg, 0.05, 5, c, max_iter=300,
                                               tol=1e-11)
            np.testing.assert_array_equal(par, serial)
            assert list(pit) == its
        rpar, _ = ref.gn_solve_blocks(w, J, r, pi, 0.7, reg, 0.05, 5, c, max_iter=300, tol=1e-11)
        np.testing.assert_allclose(par, rpar, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("reg", REGS)
def test_gn_blocks_exact_for_block_diagonal_jacobian(reg):
    """With a block-diagonal J the block-Jacobi surrogate IS the full GN surrogate."""
    rng = np.random.default_rng(7)
    d, c = 12, 3
    bounds = kernels.block_bounds(d, c)
    J = np.zeros((18, d))
    for k in range(c):
        J[6 * k:6 * k + 6, bounds[k]:bounds[k + 1]] = rng.standard_normal((6, bounds[k + 1] - bounds[k]))
    w, r, pi = rng.standard_normal(d), rng.standard_normal(18), rng.standard_normal(d)
    full, _ = kernels.gn_solve(w, J, r, pi, 0.4, reg, 0.2, 6, max_iter=3000, tol=1e-13)
    blk, _ = kernels.gn_solve_blocks(w, J, r, pi, 0.4, reg, 0.2, 6, c, max_iter=3000, tol=1e-13)
    np.testing.assert_allclose(blk, full, atol=1e-10)


def _gn_clustered(m=30, d=12, seed=11):
    """J with its two largest singular values 1.0 and 0.99: 30 power steps leave an estimate
    that depends on the start vector, so the FISTA step size does too."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, d)))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.concatenate([[1.0, 0.99], np.linspace(0.5, 0.1, d - 2)])
    J = (U * s) @ V.T
    return rng.standard_normal(d), J, rng.standard_normal(m), 0.1 * rng.standard_normal(d)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("max_iter,tol", [(1, 0.0), (2, 0.0), (60, 0.5)])
def test_gn_early_stop_matches_reference(reg, max_iter, tol):
    """Stopped after 1-2 steps, or at a loose tolerance: every iterate of CG / FISTA (step size from
    the power bound, the last iterate kept on convergence) equals the twin's to rounding."""
    w, J, r, pi = _gn_clustered()
    got, it = kernels.gn_solve(w, J, r, pi, 0.05, reg, 0.02, 3, max_iter=max_iter, tol=tol)
    want, rit = ref.gn_solve(w, J, r, pi, 0.05, reg, 0.02, 3, max_iter=max_iter, tol=tol)
    assert it == rit and (tol == 0.0 or it < max_iter)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reg", REGS)
def test_gn_zero_jacobian_is_the_linearized_closed_form(reg):
    """J = 0, r = 0: the surrogate is pi^T d + tau/2 ||d||^2 + r(w + d), solved in closed form
    (the power bound is 0: FISTA's step is 1/tau)."""
    rng = np.random.default_rng(12)
    w, pi = rng.standard_normal(9), rng.standard_normal(9)
    tau, lam = 0.7, 0.3
    v = w - pi / tau
    want = {"none": v, "l2": (tau * w - pi) / (tau + 2 * lam),
            "l1": np.sign(v) * np.maximum(np.abs(v) - lam / tau, 0.0)}[reg]
    for blocks in (0, 3):
        J, r = np.zeros((5, 9)), np.zeros(5)
        if blocks:
            got, _ = kernels.gn_solve_blocks(w, J, r, pi, tau, reg, lam, 2, blocks, max_iter=50, tol=1e-14)
        else:
            got, _ = kernels.gn_solve(w, J, r, pi, tau, reg, lam, 2, max_iter=50, tol=1e-14)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
        assert reg != "l1" or (got == 0).any()


def test_gn_default_max_iter_and_tol():
    """The documented defaults max_iter=100, tol=1e-10 (twin called with them spelled out)."""
    w, J, r, pi = _gn_clustered()
    # ill-conditioned l1 problem (tau / L ~ 1e-4): FISTA runs into the iteration limit
    got, it = kernels.gn_solve(w, J, r, pi, 1e-4, "l1", 0.02, 1)
    want, rit = ref.gn_solve(w, J, r, pi, 1e-4, "l1", 0.02, 1, max_iter=100, tol=1e-10)
    assert it == rit == 100
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    got_b, it_b = kernels.gn_solve_blocks(w, J, r, pi, 1e-4, "l1", 0.02, 1, 2)
    want_b, rit_b = ref.gn_solve_blocks(w, J, r, pi, 1e-4, "l1", 0.02, 1, 2, max_iter=100, tol=1e-10)
    assert list(it_b) == list(rit_b) == [100, 100]
    np.testing.assert_allclose(got_b, want_b, rtol=1e-12, atol=1e-13)
    # well-conditioned CG problem: stops on the tolerance, long before the limit
    for blocks in (0, 2):
        if blocks:
            got, its = kernels.gn_solve_blocks(w, J, r, pi, 1.0, "l2", 0.1, 2, blocks)
            want, rits = ref.gn_solve_blocks(w, J, r, pi, 1.0, "l2", 0.1, 2, blocks, max_iter=100, tol=1e-10)
        else:
            got, its = kernels.gn_solve(w, J, r, pi, 1.0, "l2", 0.1, 2)
            want, rits = ref.gn_solve(w, J, r, pi, 1.0, "l2", 0.1, 2, max_iter=100, tol=1e-10)
        assert np.array_equal(its, rits) and 0 < np.max(its) < 100
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_gn_validates():
    w, J, r, pi = _gn_problem(6, 4)
    with pytest.raises(ValueError, match="J must have shape"):
        kernels.gn_solve(w, J[:, :3], r, pi, 1.0, "l2", 0.1, 2)
    with pytest.raises(ValueError, match=r"r must have shape \(6,\)"):
        kernels.gn_solve(w, J, r[:5], pi, 1.0, "l2", 0.1, 2)
    with pytest.raises(ValueError, match="tau"):
        kernels.gn_solve(w, J, r, pi, 0.0, "l2", 0.1, 2)
    with pytest.raises(TypeError, match="dtype"):
        kernels.gn_solve(w, J.astype(np.int32), r, pi, 1.0, "l2", 0.1, 2)
    with pytest.raises(TypeError, match="dtype"):
        kernels.gn_solve(w, J, r.astype(np.float32), pi, 1.0, "l2", 0.1, 2)
    with pytest.raises(ValueError, match="n_samples"):
        kernels.gn_solve(w, J, r, pi, 1.0, "l2", 0.1, 0)
    with pytest.raises(ValueError, match="max_iter"):
        kernels.gn_solve(w, J, r, pi, 1.0, "l2", 0.1, 2, max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        kernels.gn_solve(w, J, r, pi, 1.0, "l2", 0.1, 2, tol=-1.0)
    with pytest.raises(ValueError, match="overlap"):
        kernels.gn_solve(w, J, r, pi, 1.0, "l2", 0.1, 2, out=w)
    with pytest.raises(ValueError, match="gn_solve_blocks: n_blocks"):
        kernels.gn_solve_blocks(w, J, r, pi, 1.0, "l2", 0.1, 2, 0)
    with pytest.raises(ValueError, match="lam"):
        kernels.gn_solve(w, J, r, pi, 1.0, "l2", -0.1, 2)


# ---------------------------------------------------------------- the Python path
NOJIT_SUBSET = [
    "tests/test_kernels_prox.py::test_soft_threshold_matches_reference",
    "tests/test_kernels_prox.py::test_prox_dispatch_and_aliasing",
    "tests/test_kernels_prox.py::test_prox_validates",
    "tests/test_kernels_surrogate.py::test_linearized_step_aliasing",
    "tests/test_kernels_surrogate.py::test_linearized_blocks_equal_serial",
    "tests/test_kernels_surrogate.py::test_gn_matches_reference",
    "tests/test_kernels_surrogate.py::test_gn_blocks_equal_serial_per_block",
    "tests/test_kernels_losses.py::test_losses_match_reference",
    "tests/test_kernels_losses.py::test_losses_blocks_match_serial",
]


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="already the Python path")
def test_python_path_without_jit():
    """The same kernels as plain Python (NUMBA_DISABLE_JIT=1): coverage of the kernel bodies."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *NOJIT_SUBSET], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
