"""mpidl.kernels.losses against its NumPy twin, finite differences and scipy's check_grad."""
import numba
import numpy as np
import pytest
from scipy.optimize import check_grad

from mpidl import kernels
from reference import loss_kernels as ref

DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1), (5, 3), (101, 17), (64, 1)]
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _data(m, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, d)).astype(dtype)
    w = rng.standard_normal(d).astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    s = np.where(rng.random(m) < 0.5, -1.0, 1.0).astype(dtype)
    return w, X, y, s


def _pairs():
    return [("least_squares", 2), ("logistic", 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("name,target", _pairs())
def test_losses_match_reference(dtype, m, d, name, target):
    data = _data(m, d, dtype, m * d)
    args = (data[0], data[1], data[target])
    loss, grad = getattr(kernels, name)(*args)
    rloss, rgrad = getattr(ref, name)(*args)
    assert isinstance(loss, float) and grad.dtype == dtype and grad.shape == (d,)
    np.testing.assert_allclose(loss, rloss, rtol=TOL[dtype])
    np.testing.assert_allclose(grad, rgrad, rtol=TOL[dtype], atol=TOL[dtype] * np.abs(rgrad).max())
    out = np.full(d, np.nan, dtype)
    l2, g2 = getattr(kernels, name)(*args, out=out)
    assert g2 is out and l2 == loss
    np.testing.assert_array_equal(out, grad)


@pytest.mark.parametrize("name,target", _pairs())
def test_losses_blocks_match_serial(name, target):
    w, X, y, s = _data(203, 9, np.float64, 1)
    args = (w, X, (y, s)[target - 2])
    loss, grad = getattr(kernels, name)(*args)
    top = numba.config.NUMBA_NUM_THREADS
    try:
        for c in (1, 2, 3, 203, 500):
            results = []
            for threads in (1, 2):
                kernels.set_threads(threads)
                results.append(getattr(kernels, name + "_blocks")(*args, c))
            (l1, g1), (l2, g2) = results
            assert l1 == l2                                  # independent of the thread count
            np.testing.assert_array_equal(g1, g2)
            np.testing.assert_allclose(l1, loss, rtol=1e-13)
            np.testing.assert_allclose(g1, grad, rtol=1e-12, atol=1e-14)
            if c == 1:
                assert l1 == loss
                np.testing.assert_array_equal(g1, grad)
    finally:
        kernels.set_threads(top)


@pytest.mark.parametrize("name,target", _pairs())
def test_gradients_vs_finite_differences(name, target):
    w, X, y, s = _data(40, 6, np.float64, 2)
    lab = (y, s)[target - 2]
    f = lambda v: getattr(kernels, name)(v, X, lab)[0]          # noqa: E731
    g = lambda v: getattr(kernels, name)(v, X, lab)[1].copy()   # noqa: E731
    h = 1e-6
    fd = np.array([(f(w + h * e) - f(w - h * e)) / (2 * h) for e in np.eye(6)])
    np.testing.assert_allclose(g(w), fd, rtol=1e-7, atol=1e-8)
    assert check_grad(f, g, w) < 1e-6 * max(1.0, np.linalg.norm(g(w)))


def test_logistic_is_stable_for_large_margins():
    w, X, _, s = _data(50, 4, np.float64, 3)
    for scale in (1e3, 1e6, 1e200):
        loss, grad = kernels.logistic(w * scale, X, s)
        rloss, rgrad = ref.logistic(w * scale, X, s)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        np.testing.assert_allclose(loss, rloss, rtol=1e-12)
        np.testing.assert_allclose(grad, rgrad, rtol=1e-10, atol=1e-300)
    # perfectly separated with huge margin: loss -> 0 without underflow trouble
    loss, grad = kernels.logistic(np.ones(1), np.array([[1e4], [-1e4]]), np.array([1.0, -1.0]))
    assert loss == 0.0 and np.all(grad == 0.0)
    loss, _ = kernels.logistic(np.ones(1), np.array([[1e4]]), np.array([-1.0]))
    assert loss == pytest.approx(1e4)


def test_least_squares_zero_residual():
    w, X, _, _ = _data(20, 5, np.float64, 4)
    loss, grad = kernels.least_squares(w, X, X @ w)
    assert loss < 1e-28 and np.abs(grad).max() < 1e-14


def test_losses_validate():
    w, X, y, s = _data(6, 3, np.float64)
    with pytest.raises(ValueError, match="columns"):
        kernels.least_squares(w, X[:, :2], y)
    with pytest.raises(ValueError, match="shape"):
        kernels.least_squares(w, X, y[:5])
    with pytest.raises(TypeError, match="dtype"):
        kernels.least_squares(w, X.astype(np.float32), y)
    with pytest.raises(ValueError, match="2-D"):
        kernels.least_squares(w, X[0], y)
    with pytest.raises(ValueError, match="no rows"):
        kernels.least_squares(w, X[:0], y[:0])
    with pytest.raises(ValueError, match="labels"):
        kernels.logistic(w, X, y)
    with pytest.raises(ValueError, match="overlap"):
        kernels.logistic(w, X, s, out=w)
    with pytest.raises(ValueError, match="n_blocks"):
        kernels.logistic_blocks(w, X, s, 0)
    for bad in (True, np.bool_(True), 2.0, "2"):          # a count is an integer, not a bool or float
        with pytest.raises(ValueError, match=r"n_blocks must be an integer >= 1, got"):
            kernels.least_squares_blocks(w, X, y, bad)
    assert kernels.least_squares_blocks(w, X, y, np.int32(2))[0] == pytest.approx(ref.least_squares(w, X, y)[0])


def test_losses_error_messages_name_the_argument_and_sizes():
    w, X, y, s = _data(6, 3, np.float64)
    with pytest.raises(ValueError, match="X has 2 columns but w has 3 entries"):
        kernels.least_squares(w, X[:, :2], y)
    with pytest.raises(ValueError, match=r"least_squares: y must have shape \(6,\)"):
        kernels.least_squares(w, X, y[:5])
    with pytest.raises(ValueError, match=r"logistic: s must have shape \(6,\)"):
        kernels.logistic(w, X, s[:5])


def test_block_kernels_check_labels_too():
    w, X, y, s = _data(6, 3, np.float64)
    with pytest.raises(ValueError, match="labels"):
        kernels.logistic_blocks(w, X, (s > 0).astype(np.float64), 2)
