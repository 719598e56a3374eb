"""mpidl.kernels.admm against its NumPy twin (tests/reference/admm_kernels.py)."""
import numpy as np
import pytest

from mpidl.kernels import admm as K
from reference import admm_kernels as ref

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-6, np.float64: 1e-14}


def _arrs(k, shape, dtype, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(shape)).astype(dtype) for _ in range(k)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (200, 65)])
def test_z_update_matches_twin(dtype, shape):
    a, z0, q = _arrs(3, shape, dtype, seed=shape[0])
    got = K.z_update(a, z0, q)
    assert got.dtype == dtype and got.shape == a.shape
    np.testing.assert_allclose(got, ref.z_update(a, z0, q), rtol=RTOL[dtype], atol=1e-30)


def test_z_update_branch_boundaries():
    # each case sits on a boundary: (a + z0)/2 == 0, (a + q + z0)/3 == 0, and exact ties
    a = np.array([1.0, -1.0, 0.0, 3.0, -3.0, 0.0, 2.0, 0.0, -0.5], dtype=np.float64)
    z0 = np.array([-1.0, 1.0, 0.0, -1.0, 1.0, 0.0, -2.0, 1e-300, 0.5], dtype=np.float64)
    q = np.array([0.0, 0.0, 0.0, -2.0, 2.0, 5.0, 0.0, 0.0, 0.0], dtype=np.float64)
    got = K.z_update(a, z0, q)
    want = ref.z_update(a, z0, q)
    np.testing.assert_array_equal(got, want)
    # z- candidate (a + z0)/2 is exactly 0 for case 0 and 1: both branches give z = 0
    assert got[0] == 0.0 and got[1] == 0.0
    # at a tie the z <= 0 branch wins (the value is the same, so the objective is too)
    for i in range(len(a)):
        zs = np.linspace(-6, 6, 120001)
        f = ref.z_objective(zs, a[i], z0[i], q[i])
        assert ref.z_objective(got[i], a[i], z0[i], q[i]) <= f.min() + 1e-8


@pytest.mark.parametrize("seed", range(5))
def test_z_update_is_global_minimiser(seed):
    a, z0, q = _arrs(3, (40,), np.float64, seed=seed, scale=2.0)
    got = K.z_update(a, z0, q)
    zs = np.linspace(-10, 10, 200001)[:, None]
    fmin = ref.z_objective(zs, a, z0, q).min(axis=0)
    assert np.all(ref.z_objective(got, a, z0, q) <= fmin + 1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_z_step_matches_twin(dtype):
    z, r, q = _arrs(3, (50, 9), dtype, seed=3)
    z1, r1 = z.copy(), r.copy()
    z2, r2 = z.copy(), r.copy()
    K.z_step(z1, r1, q)
    ref.z_step(z2, r2, q)
    np.testing.assert_allclose(z1, z2, rtol=RTOL[dtype], atol=1e-30)
    np.testing.assert_allclose(r1, r2, rtol=10 * RTOL[dtype], atol=10 * RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_z_step_dual_and_p_grad_dual_match_twins(dtype):
    z, r, q, p, g = _arrs(5, (43, 7), dtype, seed=11)
    z1, r1, q1 = z.copy(), r.copy(), q.copy()
    z2, r2, q2 = z.copy(), r.copy(), q.copy()
    K.z_step_dual(z1, r1, q1, 0.3)
    ref.z_step_dual(z2, r2, q2, 0.3)
    np.testing.assert_allclose(z1, z2, rtol=RTOL[dtype], atol=1e-30)
    np.testing.assert_allclose(r1, r2, rtol=10 * RTOL[dtype], atol=10 * RTOL[dtype])
    np.testing.assert_allclose(q1, q2, rtol=RTOL[dtype], atol=1e-7 if dtype == np.float32 else 1e-16)
    g1, g2 = g.copy(), g.copy()
    K.p_grad_dual(g1, p, q, z, 0.3, 0.2)
    ref.p_grad_dual(g2, p, q, z, 0.3, 0.2)
    np.testing.assert_allclose(g1, g2, rtol=RTOL[dtype], atol=1e-6 if dtype == np.float32 else 1e-15)


def test_implicit_dual_equals_stored_dual():
    # after q = (nu relu z + rho p + u) / (nu + rho) and u += rho (p - q): u == nu (q - relu z)
    z, p, u = _arrs(3, (300,), np.float64, seed=4)
    nu, rho = 0.3, 0.7
    q = K.q_update(z, p, u, nu, rho)
    K.u_update(u, p, q, rho)
    np.testing.assert_allclose(u, nu * (q - np.maximum(z, 0)), rtol=1e-12, atol=1e-14)
    # the fused path: z_step_dual leaves u_old in q, q_update(u=q, out=q) gives the same q
    z0, r = _arrs(2, (300,), np.float64, seed=5)
    qa, qb = q.copy(), q.copy()
    za, ra, zb, rb = z0.copy(), r.copy(), z0.copy(), r.copy()
    ub = nu * (qb - np.maximum(zb, 0))
    K.z_step(zb, rb, qb)
    K.q_update(zb, p, ub, nu, rho, out=qb)
    K.z_step_dual(za, ra, qa, nu)
    K.q_update(za, p, qa, nu, rho, out=qa)
    np.testing.assert_array_equal(za, zb)
    np.testing.assert_allclose(qa, qb, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_u_axpy_pgrad_match_twins(dtype):
    z, p, u, q, g = _arrs(5, (31, 17), dtype, seed=5)
    np.testing.assert_allclose(K.q_update(z, p, u, 1e-4, 3e-4), ref.q_update(z, p, u, 1e-4, 3e-4),
                               rtol=RTOL[dtype])
    u1, u2 = u.copy(), u.copy()
    K.u_update(u1, p, q, 0.7)
    ref.u_update(u2, p, q, 0.7)
    np.testing.assert_array_equal(u1, u2)
    y1, y2 = g.copy(), g.copy()
    K.axpy(y1, p, -0.25)
    ref.axpy(y2, p, -0.25)
    np.testing.assert_array_equal(y1, y2)
    g1, g2 = g.copy(), g.copy()
    K.p_grad(g1, p, q, u, 0.3, 0.2)
    ref.p_grad(g2, p, q, u, 0.3, 0.2)
    np.testing.assert_allclose(g1, g2, rtol=RTOL[dtype], atol=1e-6 if dtype == np.float32 else 1e-15)
    assert K.sumsq(g) == pytest.approx(ref.sumsq(g), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_columns_and_refresh(dtype):
    r, z = _arrs(2, (129, 11), dtype, seed=8)
    b = np.linspace(-1, 1, 11).astype(dtype)
    r1, b1, r2, b2 = r.copy(), b.copy(), r.copy(), b.copy()
    m1 = K.center_columns(r1, b1)
    m2 = ref.center_columns(r2, b2)
    np.testing.assert_allclose(m1, m2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b1, b2, rtol=RTOL[dtype])
    np.testing.assert_allclose(r1, r2, rtol=RTOL[dtype], atol=1e-6)
    np.testing.assert_allclose(r1.astype(np.float64).mean(axis=0), 0, atol=1e-6)
    r1, r2 = r.copy(), r.copy()
    np.testing.assert_allclose(K.resid_refresh(r1, z, b), ref.resid_refresh(r2, z, b), rtol=RTOL[dtype])


def test_results_do_not_depend_on_threads():
    import numba
    from mpidl.kernels import set_threads
    x = _arrs(1, (100001,), np.float32, seed=1)[0]
    set_threads(1)
    s1 = K.sumsq(x)
    set_threads(numba.config.NUMBA_NUM_THREADS)
    assert K.sumsq(x) == s1
    set_threads(1)


@pytest.mark.parametrize("seed", range(6))
def test_backtrack_matches_evaluating_twin(seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((8, 8)) * (1 + seed)
    H = A.T @ A + 0.1 * np.eye(8)
    c = rng.standard_normal(8)
    x = rng.standard_normal(8)
    f = lambda v: 0.5 * v @ H @ v + c @ v  # noqa: E731
    g = H @ x + c
    for tau0 in (0.01, 1.0, 10.0):
        for md in (0, 3, 10):
            want = ref.backtrack_on(f, x, g, tau0, md)
            got = K.backtrack(g @ g, g @ H @ g, tau0, md)
            assert got == pytest.approx(want, rel=1e-12), (tau0, md)


def test_backtrack_cap_is_reached_and_bounded():
    # curvature far above tau0 * 2^cap: every trial fails, the step is rejected
    t, k, ok = K.backtrack(1.0, 1e12, 10.0, 10)
    assert (t, k, ok) == (10.0 * 2 ** 10, 10, False)
    assert K.backtrack(1.0, 1e12, 10.0, 0) == (10.0, 0, False)
    # exactly on the bound ghg = t gg: accepted at that t
    assert K.backtrack(2.0, 80.0, 10.0, 5) == (40.0, 2, True)
    # zero gradient: accepted at once
    assert K.backtrack(0.0, 0.0, 10.0, 3) == (10.0, 0, True)
    with pytest.raises(ValueError):
        K.backtrack(1.0, 1.0, 0.0, 3)
    with pytest.raises(ValueError):
        K.backtrack(1.0, 1.0, 1.0, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_iter", [0, 1, 7, 60])
def test_ce_prox_matches_twin(dtype, max_iter):
    rng = np.random.default_rng(max_iter)
    a = (3 * rng.standard_normal((57, 10))).astype(dtype)
    z0 = rng.standard_normal((57, 10)).astype(dtype)
    y = rng.integers(0, 10, 57)
    out, ce, its = K.ce_prox(a, y, z0, 0.5, 1.0, max_iter, 1e-9)
    w_out, w_ce, w_its = ref.ce_prox(a, y, z0, 0.5, 1.0, max_iter, 1e-9)
    assert its == w_its
    np.testing.assert_allclose(out, w_out, rtol=RTOL[dtype], atol=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(ce, w_ce, rtol=1e-5 if dtype == np.float32 else 1e-11)
    if max_iter == 0:
        np.testing.assert_array_equal(out, z0)


def test_ce_prox_converges_to_stationary_point():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((20, 5))
    y = rng.integers(0, 5, 20)
    nu = 0.3
    z, _, its = K.ce_prox(a, y, np.zeros_like(a), nu, 1.0, 2000, 0.0)
    e = np.exp(z - z.max(1, keepdims=True))
    grad = e / e.sum(1, keepdims=True) - np.eye(5)[y] + nu * (z - a)
    assert its <= 2000 and np.abs(grad).max() < 1e-6
    with pytest.raises(ValueError, match="labels"):
        K.ce_prox(a, y + 5, a, nu, 1.0, 5, 0.0)
    with pytest.raises(ValueError, match="step"):
        K.ce_prox(a, y, a, nu, 3.0, 5, 0.0)


def test_input_checks():
    a = np.zeros(5)
    with pytest.raises(TypeError):
        K.z_update(a, a.astype(np.float32), a)
    with pytest.raises(ValueError):
        K.z_update(a, np.zeros(4), a)
    with pytest.raises(ValueError, match="nu"):
        K.q_update(a, a, a, 0.0, 1.0)
    with pytest.raises(ValueError, match="rho"):
        K.u_update(a.copy(), a, a, -1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.sumsq(np.zeros((4, 4))[:, ::2])


# -- tests added by the third mutation run (docs/testing.md) -------------------------
def test_ce_prox_large_logits_and_one_class():
    # logits far apart: the max shift must use the whole row (v[0] included), else exp overflows
    a = np.array([[800.0, 0.0, -5.0], [0.0, 900.0, 1.0], [-700.0, 3.0, 750.0]])
    z0 = a.copy()
    y = np.array([1, 0, 2])
    out, ce, its = K.ce_prox(a, y, z0, 0.5, 1.0, 5, 0.0)
    w_out, w_ce, w_its = ref.ce_prox(a, y, z0, 0.5, 1.0, 5, 0.0)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(ce)) and its == w_its == 5
    np.testing.assert_allclose(out, w_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ce, w_ce, rtol=1e-12)
    # one class: CE is identically 0, so z = a is the minimiser; the FISTA map sends a to a
    a1 = np.array([[0.5], [-2.0]])           # (a + s nu a) / (1 + s nu) == a exactly for these
    out1, ce1, its1 = K.ce_prox(a1, np.array([0, 0]), a1.copy(), 0.5, 1.0, 3, 0.0)
    np.testing.assert_allclose(out1, a1, rtol=1e-15)
    np.testing.assert_array_equal(ce1, 0.0)
    # started at the minimiser, the objective does not change: a change <= tol = 0 stops after 1 step
    assert its1 == ref.ce_prox(a1, np.array([0, 0]), a1, 0.5, 1.0, 3, 0.0)[2] == 1


def test_ce_prox_argument_checks():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 3))          # 6 rows, 3 classes: rows != columns
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="labels"):
        K.ce_prox(a, np.array([0, 1, 3, 0, 1, 2]), a, 0.5, 1.0, 5, 0.0)  # label == C is out of range
    with pytest.raises(ValueError, match="length 6"):
        K.ce_prox(a, y[:5], a, 0.5, 1.0, 5, 0.0)
    with pytest.raises(ValueError, match="labels"):
        K.ce_prox(a, np.array([0, 1, -1, 0, 1, 2]), a, 0.5, 1.0, 5, 0.0)  # label -1 too
    with pytest.raises(ValueError, match="max_iter"):
        K.ce_prox(a, y, a, 0.5, 1.0, -1, 0.0)
    with pytest.raises(ValueError, match="tol"):
        K.ce_prox(a, y, a, 0.5, 1.0, 5, -0.5)
    with pytest.raises(ValueError, match=r"ce must be float64 of shape \(6,\)"):
        K.ce_prox(a, y, a, 0.5, 1.0, 5, 0.0, ce=np.empty(3))
    with pytest.raises(ValueError, match=r"ce must be float64"):
        K.ce_prox(a, y, a, 0.5, 1.0, 5, 0.0, ce=np.empty(6, dtype=np.float32))
    # no rows: nothing to do, zero steps
    out0, ce0, its0 = K.ce_prox(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), np.zeros((0, 3)), 0.5, 1.0, 5, 0.0)
    assert out0.shape == (0, 3) and ce0.shape == (0,) and its0 == 0
    # one row
    o1, c1, i1 = K.ce_prox(a[:1], y[:1], a[:1].copy(), 0.5, 1.0, 4, 0.0)
    w1 = ref.ce_prox(a[:1], y[:1], a[:1], 0.5, 1.0, 4, 0.0)
    np.testing.assert_allclose(o1, w1[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c1, w1[1], rtol=1e-12)
    assert i1 == w1[2] == 4
    # step = 2 (1 / the curvature bound) is allowed
    np.testing.assert_allclose(K.ce_prox(a, y, a, 0.5, 2.0, 4, 0.0)[0], ref.ce_prox(a, y, a, 0.5, 2.0, 4, 0.0)[0],
                               rtol=1e-12, atol=1e-14)
    ce = np.full(6, np.nan)                    # a caller's ce buffer of the right shape is filled
    out, got, its = K.ce_prox(a, y, a.copy(), 0.5, 1.0, 5, 0.0, ce=ce)
    assert got is ce
    np.testing.assert_allclose(ce, ref.ce_prox(a, y, a, 0.5, 1.0, 5, 0.0)[1], rtol=1e-12)


def test_scalar_and_row_checks():
    a = np.zeros(5)
    for bad in (0.0, -0.5):                     # nu, rho > 0 (open bound) in every kernel
        with pytest.raises(ValueError, match="rho"):
            K.q_update(a, a, a, 1.0, bad)
        with pytest.raises(ValueError, match="rho"):
            K.p_grad_dual(a.copy(), a, a, a, 1.0, bad)
        with pytest.raises(ValueError, match="rho"):
            K.p_grad(a.copy(), a, a, a, 1.0, bad)
        with pytest.raises(ValueError, match="rho"):
            K.u_update(a.copy(), a, a, bad)
        with pytest.raises(ValueError, match="nu"):
            K.p_grad(a.copy(), a, a, a, bad, 1.0)
        with pytest.raises(ValueError, match="nu"):
            K.p_grad_dual(a.copy(), a, a, a, bad, 1.0)
        with pytest.raises(ValueError, match="nu"):
            K.z_step_dual(a.copy(), a.copy(), a.copy(), bad)
        a2 = np.zeros((2, 3))
        with pytest.raises(ValueError, match="step"):
            K.ce_prox(a2, np.array([0, 1]), a2, 0.5, bad, 5, 0.0)
        with pytest.raises(ValueError, match="nu"):
            K.ce_prox(a2, np.array([0, 1]), a2, bad, 1.0, 5, 0.0)
    with pytest.raises(ValueError, match="no rows"):
        K.center_columns(np.zeros((0, 3)), np.zeros(3))
    r1, b1 = np.array([[1.0, -2.0, 4.0]]), np.array([0.5, 0.0, -1.0])   # one row: its mean is itself
    np.testing.assert_array_equal(K.center_columns(r1, b1), [1.0, -2.0, 4.0])
    np.testing.assert_array_equal(b1, [1.5, -2.0, 3.0])
    np.testing.assert_array_equal(r1, 0.0)
    with pytest.raises(ValueError, match="b has 2 entries, r has 3 columns"):
        K.center_columns(np.zeros((4, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="b has 2 entries, r has 3 columns"):
        K.resid_refresh(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros(2))


def test_list_input_and_partial_overlap():
    assert K.sumsq([3.0, 4.0]) == 25.0              # array-likes are accepted
    buf = np.arange(12, dtype=np.float64)
    a, z0, q = buf[:10], np.zeros(10), np.ones(10)
    with pytest.raises(ValueError, match="out partially overlaps a"):
        K.z_update(a, z0, q, out=buf[2:12])
    with pytest.raises(ValueError, match="out partially overlaps z"):
        K.q_update(a, z0, q, 1.0, 1.0, out=buf[1:11])


def test_backtrack_argument_bounds():
    with pytest.raises(ValueError, match="gg"):
        K.backtrack(-0.5, 1.0, 1.0, 3)
    for eta in (1.0, 0.5):                          # eta > 1: the trial t must grow
        with pytest.raises(ValueError, match="eta"):
            K.backtrack(1.0, 1.0, 1.0, 3, eta=eta)
    # eta = 3: t = 1, 3, 9; ghg = 9 gg is accepted at t = 9 (decrease = gg/t - ghg/(2t^2) = gg/(2t))
    assert K.backtrack(1.0, 9.0, 1.0, 5, eta=3.0) == (9.0, 2, True)


def test_ce_prox_label_checks():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 3))
    y = np.array([2, 1, 1, 2, 1, 2])                # valid labels that never use class 0
    np.testing.assert_allclose(K.ce_prox(a, y, a.copy(), 0.5, 1.0, 4, 0.0)[1],
                               ref.ce_prox(a, y, a, 0.5, 1.0, 4, 0.0)[1], rtol=1e-12)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        K.ce_prox(a, y + 1, a, 0.5, 1.0, 4, 0.0)
    for bad in (y.reshape(6, 1), y.astype(np.float64)):   # 2-D or non-integer labels
        with pytest.raises(ValueError, match="1-D integer labels of length 6"):
            K.ce_prox(a, bad, a, 0.5, 1.0, 4, 0.0)
    with pytest.raises(ValueError, match="at least one column"):
        K.ce_prox(np.zeros((2, 0)), np.array([0, 0]), np.zeros((2, 0)), 0.5, 1.0, 4, 0.0)


def test_empty_arrays():
    e = np.zeros(0)
    assert K.sumsq(e) == 0.0
    assert K.z_update(e, e, e).shape == (0,) and K.q_update(e, e, e, 1.0, 1.0).shape == (0,)
    assert K.axpy(e.copy(), e, 2.0).shape == (0,)
