"""Learning-rate schedules (mpidl.algorithms.base.lr_at) against hand-worked values and the
independent NumPy formula in tests/reference/cdsgd.py; schedule validation."""
import math
from types import SimpleNamespace

import pytest

from mpidl.algorithms.base import check_lr, lr_at
from reference.cdsgd import lr_schedule


def _cfg(kind, lr=0.2, decay=0.5, power=1.0, step_epochs=2.0):
    return SimpleNamespace(lr_schedule=kind, lr=lr, decay=decay, power=power, step_epochs=step_epochs)


@pytest.mark.parametrize("kind,kw,spe,expect", [
    ("constant", {}, 3, {0: 0.2, 1: 0.2, 17: 0.2}),
    # lr / (1 + decay k)^power: k=1 -> 0.2/1.5, k=3 -> 0.2/2.5, power 2 at k=2 -> 0.2/4
    ("diminishing", {}, 3, {0: 0.2, 1: 0.2 / 1.5, 3: 0.2 / 2.5}),
    ("diminishing", {"power": 2.0}, 3, {0: 0.2, 2: 0.05}),
    # step_epochs=2, 3 steps/epoch: steps 0..5 -> 0.2, 6..11 -> 0.1, 12 -> 0.05
    ("step", {}, 3, {0: 0.2, 5: 0.2, 6: 0.1, 11: 0.1, 12: 0.05}),
    ("step", {"step_epochs": 0.5, "decay": 0.1}, 4, {0: 0.2, 1: 0.2, 2: 0.02, 4: 0.002}),
])
def test_lr_at_hand_worked_values(kind, kw, spe, expect):
    cfg = _cfg(kind, **kw)
    for k, v in expect.items():
        assert math.isclose(lr_at(cfg, k, spe), v, rel_tol=1e-14), (kind, k, lr_at(cfg, k, spe), v)


@pytest.mark.parametrize("kind", ["constant", "diminishing", "step"])
@pytest.mark.parametrize("spe", [1, 7])
def test_lr_at_matches_reference_formula(kind, spe):
    cfg = _cfg(kind, lr=0.07, decay=0.3, power=0.6, step_epochs=1.5)
    ref = lr_schedule(kind, 0.07, 0.3, 0.6, 1.5, spe)
    for k in range(60):
        assert math.isclose(lr_at(cfg, k, spe), ref(k), rel_tol=1e-13), (kind, k)


@pytest.mark.parametrize("cfg,match", [
    (_cfg("cosine"), "lr_schedule"),
    (_cfg("constant", lr=0.0), "lr must be > 0"),
    (_cfg("step", step_epochs=0.0), "step_epochs"),
])
def test_bad_schedules_are_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        check_lr(cfg)
    if cfg.lr_schedule == "cosine":
        with pytest.raises(ValueError, match="unknown lr_schedule"):
            lr_at(cfg, 0, 1)


def test_good_schedules_validate():
    for kind in ("constant", "diminishing", "step"):
        assert check_lr(_cfg(kind)) is None
    assert check_lr(_cfg("step", step_epochs=0.5)) is None          # fractional epochs are fine


def test_step_schedule_with_zero_steps_per_epoch_counts_steps_as_epochs():
    """steps_per_epoch < 1 is treated as 1 (documented max(steps_per_epoch, 1))."""
    cfg = _cfg("step", lr=1.0, decay=0.5, step_epochs=2.0)
    assert [lr_at(cfg, k, 0) for k in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("name", ["lsgd", "easgd"])
def test_workers_built_without_steps_per_epoch_take_one_step_per_epoch(name):
    """The documented default steps_per_epoch = 1 of LSGD / EASGD: a step schedule decays every
    step_epochs steps (the reference formula with one step per epoch)."""
    from mpidl import config
    cfg = config.load(None, [f"algorithm.name={name}", "algorithm.lr_schedule=step", "algorithm.lr=0.4",
                             "algorithm.decay=0.5", "algorithm.step_epochs=2"]).algorithm
    algo = config.algorithm_registry()[name][1](cfg)
    ref = lr_schedule("step", 0.4, 0.5, cfg.power, 2.0, 1)
    assert [algo.lr(k) for k in range(7)] == [ref(k) for k in range(7)]
    assert ref(2) == 0.2 and ref(6) == 0.05


# -- the generic state <-> dict conversion used by checkpoints ---------------------------
def test_state_dict_round_trip_copies_into_like_buffers():
    import dataclasses
    import numpy as np
    from mpidl.algorithms.base import state_from_dict, state_to_dict

    @dataclasses.dataclass
    class S:
        x: np.ndarray
        alpha: float
        ready: bool = False

    s = S(x=np.arange(3.0), alpha=0.25, ready=True)
    d = state_to_dict(s)
    assert set(d) == {"x", "alpha", "ready"} and d["x"] is s.x and d["alpha"] == 0.25 and d["ready"] is True
    like = S(x=np.zeros(3), alpha=0.0)
    buf = like.x
    back = state_from_dict(S, {"x": [7.0, 8.0, 9.0], "alpha": 0.5, "ready": True}, like=like)
    assert back.x is buf and list(buf) == [7.0, 8.0, 9.0] and back.alpha == 0.5 and back.ready is True
    plain = state_from_dict(S, {"x": np.ones(2), "alpha": 1.0, "ready": False})
    assert list(plain.x) == [1.0, 1.0] and plain.alpha == 1.0
    with pytest.raises(KeyError, match="alpha"):
        state_from_dict(S, {"x": np.ones(3), "ready": False})
    with pytest.raises(ValueError, match="shape"):
        state_from_dict(S, {"x": np.ones(4), "alpha": 0.0, "ready": False}, like=like)
    with pytest.raises(TypeError, match=r"arrays \(NumPy or torch\) and Python scalars"):
        state_to_dict(S(x=[1.0], alpha=0.0))
    # a device-form state (torch tensors): NumPy in the dict, values copied back into the tensors
    import torch
    t = S(x=torch.arange(3.0), alpha=0.25)
    d = state_to_dict(t)
    assert isinstance(d["x"], np.ndarray) and list(d["x"]) == [0.0, 1.0, 2.0]
    tbuf = torch.zeros(3)
    back = state_from_dict(S, {"x": np.array([4.0, 5.0, 6.0]), "alpha": 0.5, "ready": False}, like=S(x=tbuf, alpha=0))
    assert back.x is tbuf and tbuf.tolist() == [4.0, 5.0, 6.0]
