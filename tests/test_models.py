"""Models, the flat parameter buffer and the torch oracle."""
import numpy as np
import pytest
import torch

from mpidl.flat import FlatModel
from mpidl.models import build_model
from mpidl.oracles import TorchOracle, batch_indices


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("linear", (5,)), ("cnn", (1, 28, 28)),
                                        ("resnet20", (1, 16, 16))])
def test_flat_views_and_gradients(name, shape):
    fm = FlatModel(build_model(name, shape, 10, hidden=(12,), seed=3))
    assert fm.dim == sum(p.numel() for p in fm.model.parameters())
    base, end = fm.params.data_ptr(), fm.params.data_ptr() + fm.dim * 4
    assert all(base <= p.data_ptr() < end for p in fm.model.parameters())
    x = torch.randn(4, *shape)
    y = torch.randint(0, 10, (4,))
    for _ in range(2):  # the second backward must not accumulate into the first
        fm.backward(torch.nn.functional.cross_entropy(fm.model(x), y))
    ref = build_model(name, shape, 10, hidden=(12,), seed=3)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).numpy()
    np.testing.assert_allclose(fm.g, want, rtol=1e-5, atol=1e-6)
    # writing the flat vector changes the model: the views are live
    before = fm.model(x).detach().clone()
    fm.x[:] = 0.0
    assert not torch.equal(before, fm.model(x).detach())


def test_same_seed_same_init_and_float64():
    a = FlatModel(build_model("mlp", (1, 8, 8), 10, seed=5), torch.float64)
    b = FlatModel(build_model("mlp", (1, 8, 8), 10, seed=5), torch.float64)
    assert a.x.dtype == np.float64 and np.array_equal(a.x, b.x)


def test_batches_are_a_pure_function_of_seed_rank_step():
    a = batch_indices(100, 16, 6, seed=1, rank=2, k=7)
    assert np.array_equal(a, batch_indices(100, 16, 6, seed=1, rank=2, k=7))
    assert not np.array_equal(a, batch_indices(100, 16, 6, seed=1, rank=3, k=7))
    epoch = np.concatenate([batch_indices(100, 16, 6, 1, 2, k) for k in range(6, 12)])
    assert len(np.unique(epoch)) == 96  # one epoch: no repeats


def test_oracle_gradient_matches_finite_differences():
    torch.manual_seed(0)
    fm = FlatModel(build_model("mlp", (3,), 0, hidden=(4,), seed=1), torch.float64)
    X, y = np.random.default_rng(0).standard_normal((20, 3)), np.random.default_rng(1).standard_normal(20)
    o = TorchOracle(fm, X, y, batch_size=20, steps_per_epoch=1, num_classes=0)
    x0 = fm.x.copy()
    _, g = o.loss_grad(x0, 0)
    g = g.copy()
    e = np.zeros_like(x0)
    for i in range(0, len(x0), 5):
        e[:] = 0
        e[i] = 1e-6
        lp, _ = o.loss_grad(x0 + e, 0)
        lm, _ = o.loss_grad(x0 - e, 0)
        assert abs((lp - lm) / 2e-6 - g[i]) < 1e-6
    J, r, m = o.residual_jacobian(x0, 0)
    np.testing.assert_allclose(J.T @ r / m, g, atol=1e-10)   # GN gradient consistency


def test_dropout_option():
    """model.dropout: off by default (no Dropout layer, nothing changes); on, it draws from torch's
    RNG in training mode only."""
    import pytest
    from mpidl.config import ConfigError, load
    from mpidl.errors import MpidlError
    plain = build_model("mlp", (1, 8, 8), 10, hidden=(12,), seed=3)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    drop = build_model("mlp", (1, 8, 8), 10, hidden=(12, 6), seed=3, dropout=0.5)
    assert [m.p for m in drop.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    cnn = build_model("cnn", (1, 8, 8), 10, seed=3, dropout=0.25)
    assert [m.p for m in cnn.modules() if isinstance(m, torch.nn.Dropout)] == [0.25]
    x = torch.randn(4, 1, 8, 8)
    drop.train()
    assert not torch.equal(drop(x), drop(x))              # a new mask each call
    drop.eval()
    assert torch.equal(drop(x), drop(x))
    with torch.no_grad():                                 # same weights as the plain model in eval mode
        for p, q in zip(build_model("mlp", (1, 8, 8), 10, hidden=(12, 6), seed=3).parameters(), drop.parameters()):
            assert torch.equal(p, q)
    with pytest.raises(MpidlError, match="dropout"):
        build_model("resnet20", (1, 8, 8), 10, dropout=0.1)
    with pytest.raises(ConfigError, match="dropout"):
        load(None, ["model.dropout=1.0"])
    assert load(None, []).model.dropout == 0.0
