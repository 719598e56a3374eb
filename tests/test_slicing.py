"""Model slicing into pipeline stages: units, cut validation, balanced cuts (against brute force)."""
import itertools

import pytest
import torch

from mpidl.errors import MpidlError
from mpidl.models import balanced_cuts, build_model, check_cuts, model_units, slice_model, unit_costs


@pytest.mark.parametrize("name,shape,units", [("mlp", (1, 8, 8), 3), ("linear", (1, 8, 8), 1),
                                              ("cnn", (1, 8, 8), 6), ("resnet20", (1, 8, 8), 11)])
def test_units_and_stages_compose_to_the_model(name, shape, units):
    torch.manual_seed(1)
    model = build_model(name, shape, 10, hidden=(16, 12), seed=3).double().eval()
    assert len(model_units(model)) == units
    x = torch.randn(5, *shape, dtype=torch.float64)
    want = model(x)
    for K in range(1, min(units, 4) + 1):
        for cuts in itertools.combinations(range(1, units), K - 1):
            stages = slice_model(model, K, cuts)
            h = x
            for s in stages:
                h = s(h)
            assert torch.equal(h, want), (name, cuts)
            # the stages hold exactly the model's parameters, in order, without duplicates
            ps = [p for s in stages for p in s.parameters()]
            assert [id(p) for p in ps] == [id(p) for p in model.parameters()]


def _brute(costs, K):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), K - 1):
        b = (0, *cuts, len(costs))
        v = max(sum(costs[i:j]) for i, j in zip(b[:-1], b[1:]))
        if best is None or v < best[0] - 1e-12:
            best = (v, cuts)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balanced_cuts_minimise_the_largest_stage(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    costs = torch.rand(n, generator=g, dtype=torch.float64).tolist()
    for K in range(1, n + 1):
        cuts = balanced_cuts(costs, K)
        b = (0, *cuts, n)
        v = max(sum(costs[i:j]) for i, j in zip(b[:-1], b[1:]))
        assert len(cuts) == K - 1 and list(cuts) == sorted(set(cuts))
        assert abs(v - _brute(costs, K)[0]) < 1e-12


def test_check_cuts_errors():
    with pytest.raises(MpidlError, match="fewer than the 4 stages"):
        check_cuts((1, 2, 3), 4, 3, "MLP")
    for K, bad in [(2, (0,)), (2, (3,)), (3, (2, 1)), (3, (1, 1)), (3, (1,)), (2, ())]:
        with pytest.raises(MpidlError, match="does not fit"):
            check_cuts(bad, K, 3, "MLP")
    assert check_cuts((1, 2), 3, 3) == (1, 2)


def test_unit_costs_leave_the_model_unchanged():
    model = build_model("resnet20", (1, 8, 8), 10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    costs = unit_costs(model_units(model), torch.randn(4, 1, 8, 8), repeats=2)
    assert len(costs) == 11 and all(c > 0 for c in costs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
