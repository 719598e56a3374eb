"""Torch models: MLP, the CDSGD paper's small CNN, ResNet-20, and a linear model.

Every rank builds the model after ``torch.manual_seed(seed)`` so all agents
start from the same weights.  Inputs are (N, C, H, W) images or (N, D)
vectors; MLP and linear models flatten their input.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mpidl.errors import MpidlError

__all__ = ["build_model", "make_model", "resolve_factory", "register_factory", "check_output", "MLP", "CNN", "ResNet20", "model_units", "slice_model", "balanced_cuts",
           "check_cuts", "unit_costs"]


class MLP(nn.Sequential):
    """Flatten, then Linear-ReLU per hidden width (each followed by Dropout(p) when p > 0), Linear."""

    def __init__(self, in_features: int, hidden, num_classes: int, dropout: float = 0.0):
        layers = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, int(h)), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)


class CNN(nn.Sequential):
    """conv 32-32-64-64 (3x3, ReLU, 2x2 max-pool after each pair), dense 512, as in arXiv 1706.07880
    (Dropout(p) after the dense layer when p > 0)."""

    def __init__(self, in_channels: int, side: int, num_classes: int, dropout: float = 0.0):
        s = side // 4
        super().__init__(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * s * s, 512), nn.ReLU(),
            *([nn.Dropout(dropout)] if dropout > 0 else []), nn.Linear(512, num_classes))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 channels."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(3):
                blocks.append(_Block(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, input_shape, num_classes: int, hidden=(256, 128), seed: int = 0,
                dropout: float = 0.0) -> nn.Module:
    """Local. Build a model with seeded initialisation (identical on every rank).

    ``dropout`` (MLP and CNN only; 0 = none) adds Dropout layers that draw from torch's RNG in
    training mode, which a checkpoint saves and a resume restores.
    """
    if not 0.0 <= dropout < 1.0:
        raise MpidlError(f"dropout must lie in [0, 1), got {dropout}")
    if dropout > 0 and name not in ("mlp", "cnn"):
        raise MpidlError(f"dropout is implemented for the mlp and cnn models, not {name!r}")
    torch.manual_seed(seed)
    in_features = int(math.prod(input_shape))
    out = max(int(num_classes), 1)
    if name == "mlp":
        return MLP(in_features, hidden, out, dropout)
    if name == "linear":
        return MLP(in_features, (), out)
    if len(input_shape) != 3 and name in ("cnn", "resnet20"):
        raise MpidlError(f"model {name!r} needs image input (C, H, W), got shape {tuple(input_shape)}")
    if name == "cnn":
        return CNN(input_shape[0], input_shape[1], out, dropout)
    if name == "resnet20":
        return ResNet20(input_shape[0], out)
    raise MpidlError(f"unknown model {name!r}; choose mlp, cnn, resnet20 or linear")


# =============================================================================
# Users' models: one resolver for built-in names and factory specs.
# =============================================================================
_FACTORIES: dict = {}


def register_factory(fn) -> str:
    """Local. Register an in-process model factory (the Python API); returns its ``[model] factory`` spec.

    The spec, ``memory:<module>.<qualname>``, is valid in this process only;
    every rank that registers the same function gets the same spec.
    """
    if not callable(fn):
        raise TypeError(f"a model factory must be callable, got {type(fn).__name__}")
    spec = f"memory:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    _FACTORIES[spec] = fn
    return spec


def resolve_factory(spec: str):
    """Local. The callable named by ``spec``: ``"package.module:function"``, ``"file.py:function"``
    (an absolute path, or relative to the working directory) or a :func:`register_factory` spec."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path
    if spec in _FACTORIES:
        return _FACTORIES[spec]
    if spec.startswith("memory:"):
        raise MpidlError(f"[model] factory {spec!r}: not registered in this process "
                         "(mpidl.models.register_factory on every rank)")
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise MpidlError(f"[model] factory must be \"package.module:function\" or \"file.py:function\", "
                         f"got {spec!r}")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise MpidlError(f"[model] factory {spec!r}: file {path} not found")
            name = f"mpidl_user_model_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            module = importlib.import_module(mod_name)
    except MpidlError:
        raise
    except Exception as e:  # noqa: BLE001  (the user's module: any import-time failure)
        raise MpidlError(f"[model] factory {spec!r}: cannot import {mod_name}: {type(e).__name__}: {e}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise MpidlError(f"[model] factory {spec!r}: {mod_name} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise MpidlError(f"[model] factory {spec!r}: {attr} is a {type(fn).__name__}, not callable")
    return fn


def make_model(mc, input_shape, num_classes: int, seed: int = 0) -> nn.Module:
    """Local. The model ``mc`` (a :class:`mpidl.config.ModelConfig`) describes, seeded identically on
    every rank: a built-in name, or the user's factory called as
    ``factory(input_shape, num_outputs, **kwargs)`` after ``torch.manual_seed(seed)``.

    ``num_outputs`` is the class count, or for regression (``num_classes == 0``)
    the number of target values per sample (1).
    """
    if not mc.factory:
        return build_model(mc.name, input_shape, num_classes, mc.hidden, seed=seed, dropout=mc.dropout)
    fn = resolve_factory(mc.factory)
    torch.manual_seed(seed)
    try:
        model = fn(tuple(int(s) for s in input_shape), max(int(num_classes), 1), **mc.factory_kwargs())
    except Exception as e:  # noqa: BLE001  (the user's code)
        raise MpidlError(f"[model] factory {mc.factory!r} raised {type(e).__name__}: {e} "
                         f"(called with input_shape={tuple(input_shape)}, num_classes={max(int(num_classes), 1)}"
                         f"{', ' + ', '.join(f'{k}={v!r}' for k, v in mc.factory_kwargs().items()) if mc.kwargs else ''})"
                         ) from None
    if not isinstance(model, nn.Module):
        raise MpidlError(f"[model] factory {mc.factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise MpidlError(f"[model] factory {mc.factory!r} returned a module without trainable parameters")
    return model


@torch.no_grad()
def check_output(model: nn.Module, sample: torch.Tensor, num_classes: int, what: str = "the model") -> None:
    """Local. Raise when ``model(sample)`` does not have one row of ``num_classes`` scores per sample
    (regression, ``num_classes == 0``: one value per sample)."""
    was = model.training
    state = {n: b.clone() for n, b in model.named_buffers()}
    model.eval()
    try:
        out = model(sample)
    except Exception as e:  # noqa: BLE001
        raise MpidlError(f"{what} fails on a batch of shape {tuple(sample.shape)}: {type(e).__name__}: {e}") from None
    finally:
        model.train(was)
        for n, b in model.named_buffers():
            b.copy_(state[n])
    n = sample.shape[0]
    want = (n, num_classes) if num_classes else (n, 1)
    ok = isinstance(out, torch.Tensor) and (tuple(out.shape) == want or (not num_classes and tuple(out.shape) == (n,)))
    if not ok:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MpidlError(f"{what} maps a batch of shape {tuple(sample.shape)} to {got}, but this data needs "
                         f"{want}" + (f" ({num_classes} class scores per sample)" if num_classes else
                                      " (one prediction per sample)"))


# =============================================================================
# Model slicing into pipeline stages (issue 8: the decoupled pipeline).
# A model is a list of "units" (the places it may be cut between); stage k is
# the nn.Sequential of units[cuts[k-1]:cuts[k]].  The units share the model's
# parameters, so slicing a seeded model gives every stage the whole model's
# initial weights.
# =============================================================================
class _Head(nn.Module):
    """ResNet-20's global average pool + linear classifier as one cuttable unit."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def model_units(model: nn.Module) -> list:
    """Local. The model's cuttable units, in order (a cut may fall only between two units).

    MLP: one unit per Linear(+ReLU) (the Flatten rides with the first);
    CNN: conv+ReLU, conv+ReLU+pool, conv+ReLU, conv+ReLU+pool+flatten, dense+ReLU, dense (6);
    ResNet-20: stem, the 9 residual blocks, pool+linear head (11).
    """
    if isinstance(model, ResNet20):
        return [model.stem, *model.blocks, _Head(model.head)]
    if isinstance(model, nn.Sequential):
        units, cur = [], []
        for layer in _flat_layers(model):  # a weight layer opens a new unit once the current one has one
            if _is_weight_layer(layer) and any(_is_weight_layer(c) for c in cur):
                units.append(nn.Sequential(*cur))
                cur = []
            cur.append(layer)
        units.append(nn.Sequential(*cur))
        return units
    raise MpidlError(f"cannot cut a {type(model).__name__} into pipeline stages: the decoupled grid with K > 1 "
                     "stages needs an nn.Sequential (nested nn.Sequential are flattened; each layer with "
                     "weights starts a cuttable unit); return one from the model factory, or use K = 1")


_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _flat_layers(seq: nn.Sequential) -> list:
    """The leaves of nested nn.Sequential containers, in order (other modules stay whole)."""
    out = []
    for layer in seq:
        out.extend(_flat_layers(layer) if type(layer) is nn.Sequential else [layer])
    return out


def _is_weight_layer(layer: nn.Module) -> bool:
    """A layer that starts a unit: one with trainable parameters, other than a normalisation layer."""
    return not isinstance(layer, _NORM) and any(p.requires_grad for p in layer.parameters())


def balanced_cuts(costs, K: int) -> tuple:
    """Local. Cut points (K - 1 unit indices) of the contiguous K-way split minimizing the largest stage cost.

    Exact dynamic program over the prefix sums; ties go to the earliest cuts.
    """
    n, K = len(costs), int(K)
    if not 1 <= K <= n:
        raise MpidlError(f"cannot cut {n} units into {K} stages")
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + float(c))
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(K + 1)]  # best[j][i]: first i units in j stages
    arg = [[0] * (n + 1) for _ in range(K + 1)]
    best[0][0] = 0.0
    for j in range(1, K + 1):
        for i in range(j, n - (K - j) + 1):
            for p in range(j - 1, i):
                v = max(best[j - 1][p], pre[i] - pre[p])
                if v < best[j][i]:
                    best[j][i], arg[j][i] = v, p
    cuts, i = [], n
    for j in range(K, 0, -1):
        i = arg[j][i]
        cuts.append(i)
    return tuple(sorted(cuts)[1:])


def check_cuts(cuts, K: int, n_units: int, model_name: str = "model") -> tuple:
    """Local. Validate K - 1 strictly increasing cut points in 1..n_units-1 (raises MpidlError)."""
    cuts = tuple(int(c) for c in cuts)
    if K > n_units:
        raise MpidlError(f"{model_name} has {n_units} cuttable units, fewer than the {K} stages asked for; "
                         f"use at most {n_units} stages")
    if len(cuts) != K - 1 or any(not 0 < c < n_units for c in cuts) or list(cuts) != sorted(set(cuts)):
        raise MpidlError(f"cut list {list(cuts)} does not fit {model_name}: {K} stages need {K - 1} strictly "
                         f"increasing cut points between 1 and {n_units - 1} ({n_units} units)")
    return cuts


def slice_model(model: nn.Module, K: int, cuts) -> list:
    """Local. The K stage modules (nn.Sequential of units) for the given cut points."""
    units = model_units(model)
    cuts = check_cuts(cuts, K, len(units), type(model).__name__)
    bounds = (0, *cuts, len(units))
    return [nn.Sequential(*units[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def unit_costs(units, sample, repeats: int = 5) -> list:
    """Local. Fastest of ``repeats`` timings (seconds) of forward + backward of each unit on ``sample``.

    Each unit's input is the previous unit's output (requiring a gradient,
    except the first unit's, as in the pipeline); the backward is driven by a
    ones gradient.  The minimum is the timing least inflated by other
    processes.  Run on one rank and broadcast: timings differ per rank.
    """
    import time
    costs, h = [], sample
    for i, u in enumerate(units):
        u.train()
        state = {n: b.clone() for n, b in u.named_buffers()}
        times = []
        for _ in range(repeats):
            x = h.detach().requires_grad_(i > 0)
            t0 = time.perf_counter()
            y = u(x)
            y.backward(torch.ones_like(y))
            times.append(time.perf_counter() - t0)
        for n, b in u.named_buffers():
            b.copy_(state[n])
        u.zero_grad(set_to_none=True)
        costs.append(min(times))
        with torch.no_grad():
            h = u(h)
        for n, b in u.named_buffers():
            b.copy_(state[n])
    return costs
