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

__all__ = ["build_model", "MLP", "CNN", "ResNet20"]


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
