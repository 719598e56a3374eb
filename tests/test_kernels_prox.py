"""mpidl.kernels.prox against its NumPy twin, plus prox properties."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpidl import kernels
from reference import prox_kernels as ref

DTYPES = [np.float32, np.float64]
SIZES = [1, 2, 7, 1000, 1001]
TOL = {np.float32: 2e-7, np.float64: 1e-15}


def _vec(n, dtype, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(n)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_soft_threshold_matches_reference(dtype, n):
    v = _vec(n, dtype, n)
    for lam in (0.0, 0.3, 10.0):
        got = kernels.soft_threshold(v, lam)
        assert got.dtype == dtype and got.shape == (n,)
        np.testing.assert_array_equal(got, ref.soft_threshold(v, lam))   # exact: x - lam, x + lam, 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_prox_l2_matches_reference(dtype, n):
    v = _vec(n, dtype, n)
    got = kernels.prox_l2(v, 0.7)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, ref.prox_l2(v, 0.7), rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reg", ["none", "l1", "l2"])
@pytest.mark.parametrize("n", [1, 33])
def test_prox_dispatch_and_aliasing(dtype, reg, n):
    v = _vec(n, dtype, 3)
    want = ref.prox(v, 0.5, reg, 0.4)
    got = kernels.prox(v, 0.5, reg, 0.4)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=0)
    assert got is not v
    y = v.copy()
    assert kernels.prox(y, 0.5, reg, 0.4, out=y) is y
    np.testing.assert_array_equal(y, got)
    y = v.copy()
    kernels.prox(y, 0.5, reg, 0.4, out=y[:])       # another view of the same memory
    np.testing.assert_array_equal(y, got)
    o = np.empty_like(v)
    assert kernels.prox(v, 0.5, reg, 0.4, out=o) is o
    np.testing.assert_array_equal(o, got)


def test_strided_input_and_nan():
    v = np.arange(-5.0, 5.0)
    np.testing.assert_array_equal(kernels.soft_threshold(v[::3], 1.5), ref.soft_threshold(v[::3], 1.5))
    got = kernels.soft_threshold(np.array([np.nan, np.inf, -np.inf, 0.2]), 0.5)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 0


finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)
vectors = hnp.arrays(np.float64, st.integers(1, 40), elements=finite)


@settings(max_examples=30, deadline=None)
@given(v=vectors, t=st.floats(1e-3, 10.0), lam=st.floats(0.0, 10.0))
def test_prox_l1_optimality(v, t, lam):
    """(v - p) / t is in lam * subdifferential of ||.||_1 at p."""
    p = kernels.prox(v, t, "l1", lam)
    s = (v - p) / t
    tol = 1e-12 * (1 + np.abs(v)) / t
    nz = p != 0
    np.testing.assert_allclose(s[nz], lam * np.sign(p[nz]), atol=tol.max(), rtol=0)
    assert np.all(np.abs(s[~nz]) <= lam + tol[~nz])


@settings(max_examples=30, deadline=None)
@given(v=vectors, t=st.floats(1e-3, 10.0), lam=st.floats(0.0, 10.0))
def test_prox_l2_optimality(v, t, lam):
    """(v - p) / t == grad (lam ||p||^2) = 2 lam p."""
    p = kernels.prox(v, t, "l2", lam)
    np.testing.assert_allclose((v - p) / t, 2 * lam * p, atol=1e-12 * (1 + np.abs(v).max()) / t)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 2**31), t=st.floats(1e-3, 10.0),
       lam=st.floats(0.0, 10.0), reg=st.sampled_from(["none", "l1", "l2"]))
def test_prox_nonexpansive(n, seed, t, lam, reg):
    rng = np.random.default_rng(seed)
    a, b = 10 * rng.standard_normal((2, n))
    d = np.linalg.norm(kernels.prox(a, t, reg, lam) - kernels.prox(b, t, reg, lam))
    assert d <= np.linalg.norm(a - b) * (1 + 1e-12) + 1e-12


def test_prox_validates():
    v = np.zeros(4)
    with pytest.raises(ValueError, match="1-D"):
        kernels.soft_threshold(np.zeros((2, 2)), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        kernels.soft_threshold(np.zeros(4, np.int64), 1.0)
    with pytest.raises(ValueError, match="lam"):
        kernels.soft_threshold(v, -1.0)
    with pytest.raises(ValueError, match="finite"):
        kernels.prox_l2(v, np.nan)
    with pytest.raises(TypeError, match="scalar"):
        kernels.prox_l2(v, "big")
    with pytest.raises(ValueError, match="reg"):
        kernels.prox(v, 1.0, "l3", 0.1)
    with pytest.raises(ValueError, match="t must be >"):
        kernels.prox(v, 0.0, "l1", 0.1)
    with pytest.raises(ValueError, match="out"):
        kernels.prox(v, 1.0, "l1", 0.1, out=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="out"):
        kernels.prox(v, 1.0, "l1", 0.1, out=np.zeros(5))
    big = np.arange(6.0)
    with pytest.raises(ValueError, match="partially overlaps"):
        kernels.soft_threshold(big[1:], 0.1, out=big[:-1])
    ro = np.zeros(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernels.prox_l2(v, 0.1, out=ro)


def test_set_threads_and_block_bounds():
    import numba
    top = numba.config.NUMBA_NUM_THREADS
    try:
        assert kernels.set_threads(0) == 1 and numba.get_num_threads() == 1
        assert kernels.set_threads(10**6) == top and numba.get_num_threads() == top
    finally:
        kernels.set_threads(top)
    for n, c in [(0, 1), (0, 3), (1, 1), (1, 4), (10, 3), (7, 7), (5, 9), (1001, 4)]:
        b = kernels.block_bounds(n, c)
        assert b[0] == 0 and b[-1] == n
        want = [len(a) for a in np.array_split(np.arange(n), min(c, max(n, 1)))]
        assert list(np.diff(b)) == want
    with pytest.raises(ValueError):
        kernels.block_bounds(4, 0)


@pytest.mark.parametrize("call", [lambda v: kernels.prox(v, 1.0, "l1", -0.5),
                                  lambda v: kernels.prox(v, 1.0, "none", -1e-3),
                                  lambda v: kernels.prox_l2(v, -0.2)])
def test_negative_lam_is_refused_by_every_entry_point(call):
    with pytest.raises(ValueError, match="lam must be >= 0"):
        call(np.ones(3))
