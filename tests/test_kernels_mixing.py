"""mpidl.kernels.combine against its NumPy twin."""
import numpy as np
import pytest

from mpidl import kernels
from reference import kernels as ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,p", [(0, 5), (1, 1), (2, 1000), (7, 33), (3, 5000), (5, 4097)])
def test_combine_matches_reference(dtype, k, p):
    rng = np.random.default_rng(k * 100 + p)
    x = rng.standard_normal(p).astype(dtype)
    recv = rng.standard_normal((k, p)).astype(dtype)
    w = rng.random(k)
    got = kernels.combine(x, recv, 0.3, w)
    want = ref.combine(x, recv, 0.3, w)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    # in place (out aliases x) gives the same result
    y = x.copy()
    kernels.combine(y, recv, 0.3, w, out=y)
    np.testing.assert_array_equal(y, got)


def test_combine_validates():
    x = np.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        kernels.combine(x, np.zeros((2, 5)), 1.0, [0, 0])
    with pytest.raises(TypeError, match="dtype"):
        kernels.combine(x, np.zeros((2, 4), np.float32), 1.0, [0, 0])
    with pytest.raises(ValueError, match="weights"):
        kernels.combine(x, np.zeros((2, 4)), 1.0, [0])


def test_combine_rejects_partial_overlap():
    buf = np.zeros(10)
    with pytest.raises(ValueError, match="overlap"):
        kernels.combine(buf[:8], np.zeros((1, 8)), 1.0, [0.0], out=buf[2:])
