"""ConvexOracle (Numba kernels) against the independent NumPy oracle in tests/reference/convex.py."""
import numpy as np
import pytest

from mpidl.oracles import ConvexOracle, batch_indices
from reference import convex as ref


def _data(kind, n=37, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    z = X @ rng.standard_normal(d)
    y = (z + 0.5 * rng.standard_normal(n) > 0).astype(float) if kind == "logistic" else z + rng.standard_normal(n)
    return X, y, rng.standard_normal(d)


@pytest.mark.parametrize("kind", ["logistic", "lsq"])
@pytest.mark.parametrize("batch,blocks", [(0, 1), (8, 1), (0, 3), (8, 4)])
def test_convex_oracle_matches_numpy(kind, batch, blocks):
    X, y, w = _data(kind)
    o = ConvexOracle(X, y, kind, batch_size=batch, steps_per_epoch=4, seed=3, rank=2, blocks=blocks)
    r = ref.ConvexRef(X, y, kind, batch_size=batch, steps_per_epoch=4, seed=3, rank=2)
    assert o.dim == r.dim == 5
    for k in range(6):                                   # crosses an epoch boundary
        lo, go = o.loss_grad(w, k)
        lr, gr = r.loss_grad(w, k)
        assert abs(lo - lr) <= 1e-12 * max(1, abs(lr)) and np.allclose(go, gr, rtol=1e-11, atol=1e-13), (k, lo, lr)
    lo, go = o.full_loss_grad(w)
    lr, gr = r.full_loss_grad(w)
    assert abs(lo - lr) <= 1e-12 * max(1, abs(lr)) and np.allclose(go, gr, rtol=1e-11, atol=1e-13)
    Xt, yt, _ = _data(kind, n=21, seed=1)
    (el, ea), (rl, ra) = o.evaluate(w, Xt, yt), r.evaluate(w, Xt, yt)
    assert abs(el - rl) <= 1e-12 * max(1, abs(rl))
    assert (np.isnan(ea) and np.isnan(ra)) if kind == "lsq" else ea == ra


@pytest.mark.parametrize("kind", ["logistic", "lsq"])
def test_gradient_is_the_derivative_of_the_loss(kind):
    """Central differences of the independent loss: catches a reference and kernel wrong together."""
    X, y, w = _data(kind)
    o = ConvexOracle(X, y, kind)
    _, g = o.full_loss_grad(w)
    h = 1e-6
    fd = np.array([(o.full_loss_grad(w + h * e)[0] - o.full_loss_grad(w - h * e)[0]) / (2 * h)
                   for e in np.eye(len(w))])
    assert np.allclose(g, fd, rtol=1e-6, atol=1e-8)
    fr = np.array([(ref.ConvexRef(X, y, kind).full_loss_grad(w + h * e)[0]
                    - ref.ConvexRef(X, y, kind).full_loss_grad(w - h * e)[0]) / (2 * h) for e in np.eye(len(w))])
    assert np.allclose(g, fr, rtol=1e-6, atol=1e-8)


def test_logistic_labels_and_accuracy_by_hand():
    """Two points, w = (1, 0): z = (2, -1); labels (1, 1): loss = mean(log(1 + e^-z)), acc 1/2."""
    X = np.array([[2.0, 5.0], [-1.0, 3.0]])
    y = np.array([1.0, 1.0])
    o = ConvexOracle(X, y, "logistic")
    loss, g = o.loss_grad(np.array([1.0, 0.0]), 0)
    assert np.isclose(loss, (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(1.0))) / 2, rtol=1e-14)
    s = 1 / (1 + np.exp(np.array([2.0, -1.0])))          # sigmoid(-z)
    assert np.allclose(g, -(X.T @ s) / 2, rtol=1e-13)
    assert o.last_correct == 0.5 and o.evaluate(np.array([1.0, 0.0]), X, y)[1] == 0.5


def test_residual_jacobian_lsq_and_logistic_refused():
    X, y, w = _data("lsq")
    o = ConvexOracle(X, y, "lsq", batch_size=8, steps_per_epoch=4, seed=1, rank=0)
    J, r, m = o.residual_jacobian(w, 5)
    Jr, rr, mr = ref.ConvexRef(X, y, "lsq", batch_size=8, steps_per_epoch=4, seed=1).residual_jacobian(w, 5)
    assert m == mr == 8 and np.array_equal(J, Jr) and np.allclose(r, rr, rtol=1e-14)
    with pytest.raises(ValueError, match="squared loss"):
        ConvexOracle(*_data("logistic")[:2], "logistic").residual_jacobian(w, 0)


@pytest.mark.parametrize("n,b,spe,seed,rank", [(37, 8, 4, 3, 2), (10, 3, 3, 0, 0), (50, 50, 1, 7, 5)])
def test_batch_indices_follow_the_documented_rule(n, b, spe, seed, rank):
    seen = []
    for k in range(3 * spe):
        idx = batch_indices(n, b, spe, seed, rank, k)
        assert np.array_equal(idx, ref.batch_indices(n, b, spe, seed, rank, k))
        seen.append(idx)
    for e in range(3):                                   # one epoch: disjoint batches
        ep = np.concatenate(seen[e * spe:(e + 1) * spe])
        assert len(set(ep.tolist())) == len(ep) == b * spe
