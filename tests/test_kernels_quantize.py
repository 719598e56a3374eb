"""mpidl.kernels.quantize against its NumPy twin (argmin of the distance to the grid)."""
import numpy as np
import pytest

from mpidl.kernels import quantize as Q
from reference import quantize_kernels as ref


def _check_nearest(idx, want, v, lo, hi, n):
    """Equal indices, or (on a rounding tie) two points equally near v."""
    g = ref.grid(lo, hi, n, np.float64)
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    i1, i2 = idx.reshape(-1).astype(np.int64), want.reshape(-1).astype(np.int64)
    diff = i1 != i2
    if diff.any():
        d1, d2 = np.abs(v[diff] - g[i1[diff]]), np.abs(v[diff] - g[i2[diff]])
        np.testing.assert_allclose(d1, d2, rtol=1e-9, atol=1e-12)
    assert diff.mean() < 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [2, 7, 256, 257, 1000])
def test_quantize_matches_twin(dtype, n):
    rng = np.random.default_rng(n)
    v = rng.uniform(-1.5, 2.5, (300, 7)).astype(dtype)
    v[0, :3] = [-1.0, 2.0, np.nan]
    idx = Q.quantize(v, -1.0, 2.0, n)
    assert idx.dtype == ref.index_dtype(n) and idx.shape == v.shape
    _check_nearest(idx, ref.quantize(v, -1.0, 2.0, n), np.nan_to_num(v, nan=-1.0), -1.0, 2.0, n)
    assert idx[0, 0] == 0 and idx[0, 1] == n - 1 and idx[0, 2] == 0
    vals = Q.dequantize(idx, -1.0, 2.0, n, dtype)
    np.testing.assert_array_equal(vals, ref.dequantize(idx, -1.0, 2.0, n, dtype))
    # the grid values are fixed points of quantize
    np.testing.assert_array_equal(Q.quantize(vals, -1.0, 2.0, n), idx)


def test_index_dtype_sizes():
    assert Q.index_dtype(256) == np.uint8
    assert Q.index_dtype(257) == np.uint16
    assert Q.index_dtype(1000) == np.uint16
    assert Q.index_dtype(65536) == np.uint16
    assert Q.index_dtype(65537) == np.uint32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_q_update_quantized_matches_twin(dtype):
    rng = np.random.default_rng(4)
    z, p, u = (rng.standard_normal((120, 13)).astype(dtype) for _ in range(3))
    u *= 1e-4
    q, idx = Q.q_update_quantized(z, p, u, 1e-4, 1e-4, -1.0, 2.0, 1000)
    qr = (1e-4 * np.maximum(z.astype(np.float64), 0) + 1e-4 * p.astype(np.float64) + u) / 2e-4
    _check_nearest(idx, ref.quantize(qr, -1.0, 2.0, 1000), qr, -1.0, 2.0, 1000)
    np.testing.assert_array_equal(q, Q.dequantize(idx, -1.0, 2.0, 1000, dtype))


def test_grid_errors():
    v = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="lo < hi"):
        Q.quantize(v, 2.0, 1.0, 10)
    with pytest.raises(ValueError, match="integer >= 2"):
        Q.quantize(v, 0.0, 1.0, 1)
    with pytest.raises(ValueError, match="resolves"):
        Q.quantize(v, 1.0, 1.001, 100000)
    with pytest.raises(ValueError, match="32-bit"):
        Q.index_dtype(2 ** 33)
    with pytest.raises(ValueError, match="indices"):
        Q.dequantize(np.array([5], dtype=np.uint16), 0.0, 1.0, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [2, 7, 1000])
def test_grid_matches_twin(dtype, n):
    np.testing.assert_array_equal(Q.grid(-1.0, 2.0, n, dtype), ref.grid(-1.0, 2.0, n, dtype))
    assert Q.grid(-1.0, 2.0, n, dtype)[-1] == dtype(2.0)


def test_out_arrays_are_used_or_rejected():
    """A valid out_idx / out is written and returned; every invalid one is an error of its own."""
    v = np.random.default_rng(5).uniform(-1, 2, (6, 5)).astype(np.float32)
    want = ref.quantize(v, -1.0, 2.0, 10)
    out_idx = np.zeros((6, 5), dtype=np.uint8)
    assert Q.quantize(v, -1.0, 2.0, 10, out_idx=out_idx) is out_idx
    np.testing.assert_array_equal(out_idx, want)
    out = np.full((6, 5), np.nan, dtype=np.float32)
    assert Q.dequantize(out_idx, -1.0, 2.0, 10, np.float32, out=out) is out
    np.testing.assert_array_equal(out, ref.dequantize(want, -1.0, 2.0, 10, np.float32))
    q_out, q_idx = np.zeros_like(v), np.zeros((6, 5), dtype=np.uint8)
    q, idx = Q.q_update_quantized(v, v, np.zeros_like(v), 1.0, 1.0, -1.0, 2.0, 10, out=q_out, out_idx=q_idx)
    assert q is q_out and idx is q_idx
    rq, ridx = ref.q_update_quantized(v, v, np.zeros_like(v), 1.0, 1.0, -1.0, 2.0, 10)
    np.testing.assert_array_equal(q_idx, ridx)
    np.testing.assert_array_equal(q_out, rq)
    ro = np.zeros((6, 5), dtype=np.uint8)
    ro.flags.writeable = False
    for bad in (np.zeros((6, 5), dtype=np.uint16),              # wrong index dtype (10 points: uint8)
                np.zeros((5, 6), dtype=np.uint8),               # wrong shape
                np.zeros((5, 12), dtype=np.uint8)[:, ::2],      # right shape, dtype; not contiguous
                ro,                                             # read-only
                [[0] * 5] * 6):                                 # not an array
        with pytest.raises(ValueError, match="out_idx"):
            Q.quantize(v, -1.0, 2.0, 10, out_idx=bad)
    for bad in (np.zeros((5, 6), dtype=np.float32), np.zeros((6, 5), dtype=np.float64),
                np.zeros((6, 10), dtype=np.float32)[:, ::2]):
        with pytest.raises(ValueError, match="out must be"):
            Q.dequantize(out_idx, -1.0, 2.0, 10, np.float32, out=bad)


def test_dequantize_rejects_bad_indices():
    with pytest.raises(TypeError, match="integer array"):
        Q.dequantize(np.zeros(4, dtype=np.uint8)[::2], 0.0, 1.0, 3)        # not contiguous
    with pytest.raises(TypeError, match="integer array"):
        Q.dequantize(np.zeros(2), 0.0, 1.0, 3)                                # float indices
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\]"):
        Q.dequantize(np.array([0, 3]), 0.0, 1.0, 3)                           # n itself
    with pytest.raises(ValueError, match="indices must lie"):
        Q.dequantize(np.array([-1, 0]), 0.0, 1.0, 3)                          # negative
    np.testing.assert_array_equal(Q.dequantize(np.array([0, 2]), 0.0, 1.0, 3, np.float64), [0.0, 1.0])
    np.testing.assert_array_equal(Q.dequantize(np.array([1, 2]), 0.0, 1.0, 3, np.float64), [0.5, 1.0])


def test_degenerate_grids_are_errors():
    v = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="lo < hi"):
        Q.quantize(v, 1.0, 1.0, 10)
    with pytest.raises(ValueError, match="integer >= 2"):
        Q.index_dtype(1)
    with pytest.raises(ValueError, match="grid: n must be an integer >= 2"):
        Q.quantize(v, 0.0, 1.0, 1)


def test_q_update_quantized_checks_weights_and_overlap():
    z = np.linspace(-1, 2, 9)
    for nu, rho in ((0.0, 1.0), (1.0, 0.0), (-0.5, 1.0)):
        with pytest.raises(ValueError, match="nu|rho"):
            Q.q_update_quantized(z, z, z, nu, rho, -1.0, 2.0, 10)
    buf = np.zeros(10)
    for name in ("z", "p_next", "u"):
        args = {"z": z.copy(), "p_next": z.copy(), "u": z.copy()}
        args[name] = buf[1:]                              # out = buf[:-1] overlaps it shifted by one
        args[name][:] = z
        with pytest.raises(ValueError, match="partially overlaps"):
            Q.q_update_quantized(args["z"], args["p_next"], args["u"], 1.0, 1.0, -1.0, 2.0, 10, out=buf[:-1])
    # an exact alias is allowed: q written over z
    zz = z.copy()
    q, idx = Q.q_update_quantized(zz, z, z, 1.0, 1.0, -1.0, 2.0, 10, out=zz)
    rq, ridx = ref.q_update_quantized(z, z, z, 1.0, 1.0, -1.0, 2.0, 10)
    assert q is zz
    np.testing.assert_array_equal(q, rq)
