"""mpidl.xp: the same operations on NumPy arrays and torch tensors give the same values and keep
the library (and device) of their input."""
import numpy as np
import pytest
import torch

from mpidl import xp


@pytest.fixture(params=["numpy", "torch"])
def make(request):
    if request.param == "numpy":
        return lambda a: np.array(a, dtype=np.float32)
    return lambda a: torch.tensor(a, dtype=torch.float32)


def test_allocation_keeps_library_dtype_and_shape(make):
    a = make([[1.0, 2.0], [3.0, 4.0]])
    for b in (xp.empty_like(a), xp.zeros_like(a), xp.copy(a), xp.zeros((3,), like=a), xp.zeros(0, like=a)):
        assert type(b) is type(a) and str(b.dtype).endswith("float32")
    assert np.array_equal(xp.to_numpy(xp.zeros_like(a)), np.zeros((2, 2)))
    c = xp.copy(a)
    c[0, 0] = 9.0
    assert float(a[0, 0]) == 1.0                      # a real copy
    assert tuple(xp.zeros((3,), like=a).shape) == (3,)


def test_subtract_assign_and_host_views(make):
    a, b = make([5.0, 7.0]), make([1.0, 2.0])
    out = xp.empty_like(a)
    xp.subtract(a, b, out=out)
    assert np.array_equal(xp.to_numpy(out), [4.0, 5.0])
    xp.subtract(a, b, out=a)                          # out may be an input
    assert np.array_equal(xp.to_numpy(a), [4.0, 5.0])
    xp.assign(a, np.array([8.0, 9.0], np.float32))    # a host array into either kind
    assert np.array_equal(xp.to_numpy(a), [8.0, 9.0])
    xp.assign(b, torch.tensor([3.0, 4.0]))            # a tensor into either kind
    assert np.array_equal(xp.to_numpy(b), [3.0, 4.0])
    assert xp.nbytes(a) == 8 and xp.on_host(a)


def test_to_numpy_of_a_cpu_tensor_is_a_view():
    t = torch.zeros(4)
    v = xp.to_numpy(t)
    v[1] = 3.0
    assert float(t[1]) == 3.0


def test_operator_updates_agree_bitwise():
    """The algorithms' update lines on float32 NumPy and torch give the same bits."""
    rng = np.random.default_rng(0)
    x, g, v = (rng.standard_normal(10001).astype(np.float32) for _ in range(3))
    forms = {"numpy": [x.copy(), g.copy(), v.copy()], "torch": [torch.from_numpy(a.copy()) for a in (x, g, v)]}
    for name, (xx, gg, vv) in forms.items():
        gg += 1e-3 * xx
        gg *= 0.05
        vv *= 0.9
        vv -= gg
        xx -= gg
        xx += 0.9 * vv
        forms[name] = xp.to_numpy(xx).copy()
    assert np.array_equal(forms["numpy"], forms["torch"])
