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


def test_combine_validates_each_condition_alone():
    """Each input check fires on its own (a check joined with `and` instead of `or` fails here)."""
    x = np.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        kernels.combine(np.zeros((4, 1)), np.zeros((2, 4)), 1.0, [0, 0])      # only x is not 1-D
    with pytest.raises(ValueError, match="shape"):
        kernels.combine(x, np.zeros(4), 1.0, [0])                             # only recv is not 2-D
    with pytest.raises(ValueError, match="out must match"):
        kernels.combine(x, np.zeros((1, 4)), 1.0, [0], out=np.zeros(5))      # only the shape differs
    with pytest.raises(ValueError, match="out must match"):
        kernels.combine(x, np.zeros((1, 4)), 1.0, [0], out=np.zeros(4, np.float32))  # only the dtype


@pytest.mark.parametrize("which", ["x", "out", "both"])
def test_combine_strided_inputs_and_outputs(which):
    rng = np.random.default_rng(3)
    xs, recv, w = rng.standard_normal(14), rng.standard_normal((3, 7)), rng.random(3)
    x = xs[::2] if which in ("x", "both") else xs[:7].copy()
    outbuf = np.zeros(14)
    out = outbuf[1::2] if which in ("out", "both") else np.zeros(7)
    got = kernels.combine(x, recv, 0.4, w, out=out)
    assert got is out
    np.testing.assert_allclose(out, ref.combine(np.ascontiguousarray(x), recv, 0.4, w), rtol=1e-14, atol=1e-14)
    if which != "x":
        assert np.all(outbuf[0::2] == 0)                                       # nothing else written


def test_combine_error_names_the_row_count():
    with pytest.raises(ValueError, match=r"3 rows but \(2,\) weights"):
        kernels.combine(np.zeros(4), np.zeros((3, 4)), 1.0, [0.5, 0.5])


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_combine_empty_vectors(k):
    out = kernels.combine(np.zeros(0), np.zeros((k, 0)), 0.5, np.full(k, 0.5 / max(k, 1)))
    assert out.shape == (0,)
