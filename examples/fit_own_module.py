"""Train your own torch module with mpidl.fit, then use the consensus-average model.

    mpiexec -n 4 python examples/fit_own_module.py
    mpiexec -n 2 python examples/fit_own_module.py --small
"""
import sys

import numpy as np
import torch
from torch import nn

import mpidl


class SmallCNN(nn.Module):
    """Any nn.Module works; every rank builds the same architecture (rank 0's weights are used)."""

    def __init__(self, classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def stripes(n, seed=0):
    """8x8 images: class 0 horizontal stripes, 1 vertical, 2 diagonal, plus noise."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    patterns = np.stack([(i % 2), (j % 2), ((i + j) % 2)]).astype(np.float32)
    y = rng.integers(0, 3, n)
    x = patterns[y] + 0.8 * rng.standard_normal((n, 8, 8))
    return x[:, None].astype(np.float32), y.astype(np.int64)      # (N, C, H, W)


def main():
    small = "--small" in sys.argv
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = stripes(1200 if small else 12000)
    x_test, y_test = stripes(300 if small else 3000, seed=1)
    result = mpidl.fit(model, (x, y), (x_test, y_test), algorithm="cdmsgd", topology="ring",
                       epochs=2 if small else 5, batch_size=32, lr=0.02, out="runs", run_name="own_module")
    # `model` now holds this rank's trained parameters; average_model() is the consensus average
    avg = result.average_model()
    with torch.no_grad():
        acc = float((avg(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"test accuracy of the average model: {result.metrics['test_acc']:.3f} (driver), "
              f"{acc:.3f} (average_model() here)")


if __name__ == "__main__":
    main()
