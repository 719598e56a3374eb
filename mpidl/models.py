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

__all__ = ["build_model", "MLP", "CNN", "ResNet20", "model_units", "slice_model", "balanced_cuts",
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
        for layer in model:  # a weight layer opens a new unit once the current one has one
            if isinstance(layer, (nn.Linear, nn.Conv2d)) and any(
                    isinstance(c, (nn.Linear, nn.Conv2d)) for c in cur):
                units.append(nn.Sequential(*cur))
                cur = []
            cur.append(layer)
        units.append(nn.Sequential(*cur))
        return units
    raise MpidlError(f"cannot cut a {type(model).__name__} into pipeline stages")


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
