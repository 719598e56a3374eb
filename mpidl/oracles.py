"""Local loss/gradient providers (never communicate).

:class:`TorchOracle` wraps a :class:`~mpidl.flat.FlatModel` and this agent's
training data.  The minibatch of step k is a pure function of
(seed, rank, k): epoch e = k // steps_per_epoch uses the permutation drawn
from ``numpy.random.default_rng([seed, rank, e])`` and step k takes the
slice ``(k mod steps_per_epoch) * batch`` of it.  A resumed run therefore
sees exactly the batches an uninterrupted run would, with no data-order state
to checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch

from mpidl.flat import FlatModel

__all__ = ["TorchOracle", "batch_indices"]


def batch_indices(n: int, batch: int, steps_per_epoch: int, seed: int, rank: int, k: int) -> np.ndarray:
    """Local. Sample indices of step ``k`` (see the module docstring)."""
    epoch, j = divmod(int(k), int(steps_per_epoch))
    perm = np.random.default_rng([int(seed), int(rank), epoch]).permutation(n)
    return perm[j * batch:(j + 1) * batch]


class TorchOracle:
    """Local. Cross-entropy (classification) or squared loss (num_classes == 0) of a torch model."""

    def __init__(self, fm: FlatModel, x, y, *, batch_size: int, steps_per_epoch: int,
                 seed: int = 0, rank: int = 0, num_classes: int = 10):
        self.fm = fm
        dtype = fm.params.dtype
        self.x = torch.as_tensor(np.asarray(x)).to(dtype)
        self.regression = num_classes == 0
        self.y = torch.as_tensor(np.asarray(y)).to(dtype if self.regression else torch.long)
        self.n = self.x.shape[0]
        self.batch = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed, self.rank = int(seed), int(rank)
        self.dim = fm.dim
        self.last_correct = 0.0

    def _loss(self, out, y):
        if self.regression:
            return 0.5 * torch.mean(torch.sum((out.reshape(y.shape[0], -1) - y.reshape(y.shape[0], -1)) ** 2, 1))
        return torch.nn.functional.cross_entropy(out, y)

    def indices(self, k: int) -> np.ndarray:
        return batch_indices(self.n, self.batch, self.steps_per_epoch, self.seed, self.rank, k)

    def loss_grad(self, x: np.ndarray, k: int):
        """Local. (loss, grad) of step k's minibatch at ``x``; grad is the model's gradient buffer."""
        self.fm.load(x)
        idx = torch.from_numpy(self.indices(k))
        xb, yb = self.x[idx], self.y[idx]
        self.fm.model.train()
        out = self.fm.model(xb)
        loss = self._loss(out, yb)
        self.fm.backward(loss)
        if not self.regression:
            self.last_correct = float((out.detach().argmax(1) == yb).float().mean())
        return float(loss.detach()), self.fm.g

    @torch.no_grad()
    def evaluate(self, x: np.ndarray, X, Y, batch: int = 1000):
        """Local. (mean loss, accuracy) of parameters ``x`` on (X, Y); accuracy is NaN for regression."""
        self.fm.load(x)
        self.fm.model.eval()
        X = torch.as_tensor(np.asarray(X)).to(self.fm.params.dtype)
        Y = torch.as_tensor(np.asarray(Y))
        Y = Y.to(self.fm.params.dtype if self.regression else torch.long)
        total, correct = 0.0, 0
        for a in range(0, X.shape[0], batch):
            out = self.fm.model(X[a:a + batch])
            yb = Y[a:a + batch]
            total += float(self._loss(out, yb)) * yb.shape[0]
            if not self.regression:
                correct += int((out.argmax(1) == yb).sum())
        n = max(X.shape[0], 1)
        return total / n, (float("nan") if self.regression else correct / n)
