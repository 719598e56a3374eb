"""Local loss/gradient providers (never communicate).

:class:`TorchOracle` wraps a :class:`~mpidl.flat.FlatModel` and this agent's
training data.  The minibatch of step k is a pure function of
(seed, rank, k): epoch e = k // steps_per_epoch uses the permutation drawn
from ``numpy.random.default_rng([seed, rank, e])`` and step k takes the
slice ``(k mod steps_per_epoch) * batch`` of it.  A resumed run therefore
sees exactly the batches an uninterrupted run would, with no data-order state
to checkpoint.

:class:`ConvexOracle` and :func:`batch_indices` live in :mod:`mpidl.convex`
(NumPy and Numba only, so a convex run never imports torch) and are
re-exported here.
"""
from __future__ import annotations

import numpy as np
import torch

from mpidl.convex import ConvexOracle, batch_indices  # noqa: F401  (re-exported; torch-free)
from mpidl.flat import FlatModel

__all__ = ["TorchOracle", "ConvexOracle", "batch_indices", "Batches", "as_batch"]


def as_batch(x, dtype) -> torch.Tensor:
    """Local. Rows (an ndarray, a tensor or lazy :class:`mpidl.sources.Rows`) as a tensor of ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.asarray(x)).to(dtype)


class Batches:
    """Local. A shard's inputs as torch batches.

    In-memory inputs are converted to ``dtype`` once; lazy HDF5 rows
    (:class:`mpidl.sources.Rows`) are read batch by batch, so a rank holds one
    batch of them at a time.  With ``augment`` each image batch of step ``k``
    gets a random crop (pad 4) and horizontal flip drawn from
    ``numpy.random.default_rng([seed, stream, k, 1])``: a pure function of the
    step, so a resumed run augments exactly as an uninterrupted one.
    """

    def __init__(self, x, dtype, *, augment=False, seed=0, stream=0):
        self.lazy = hasattr(x, "read") and not isinstance(x, np.ndarray)
        self.x = x if self.lazy else torch.as_tensor(np.asarray(x)).to(dtype)
        self.dtype, self.augment, self.seed, self.stream = dtype, bool(augment), int(seed), int(stream)
        self.shape = tuple(x.shape)

    def __len__(self):
        return self.shape[0]

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Local. Rows a..b-1 (not augmented)."""
        return as_batch(self.x[a:b], self.dtype)

    def take(self, idx: np.ndarray, k: int) -> torch.Tensor:
        """Local. The rows ``idx`` of step ``k``'s batch (augmented when asked)."""
        xb = torch.as_tensor(self.x.read(idx)).to(self.dtype) if self.lazy else self.x[torch.from_numpy(idx)]
        if self.augment:
            from mpidl.sources import augment_batch
            rng = np.random.default_rng([self.seed, self.stream, int(k), 1])
            xb = torch.from_numpy(augment_batch(xb.numpy(), rng))
        return xb


class TorchOracle:
    """Local. Loss of a torch model on this agent's data.

    ``loss="ce"``: cross-entropy; ``loss="squared"``: 1/(2m) sum_s ||f(x_s) - t_s||^2
    with t_s the one-hot label (classification) or the target (num_classes == 0,
    regression, which always uses the squared loss).
    """

    def __init__(self, fm: FlatModel, x, y, *, batch_size: int, steps_per_epoch: int,
                 seed: int = 0, rank: int = 0, num_classes: int = 10, loss: str = "ce", augment: bool = False):
        self.fm = fm
        dtype = fm.params.dtype
        self.x = Batches(x, dtype, augment=augment, seed=seed, stream=rank)
        self.regression = num_classes == 0
        self.squared = self.regression or loss == "squared"
        self.num_classes = num_classes
        self.y = torch.as_tensor(np.asarray(y)).to(dtype if self.regression else torch.long)
        self.n = len(self.x)
        self.batch = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed, self.rank = int(seed), int(rank)
        self.dim = fm.dim
        self.last_correct = 0.0
        self._perm, self._perm_epoch = None, None

    def _target(self, y):
        if self.regression:
            return y.reshape(y.shape[0], -1)
        return torch.nn.functional.one_hot(y, self.num_classes).to(self.fm.params.dtype)

    def _loss(self, out, y):
        if self.squared:
            return 0.5 * torch.mean(torch.sum((out.reshape(y.shape[0], -1) - self._target(y)) ** 2, 1))
        return torch.nn.functional.cross_entropy(out, y)

    def full_loss_grad(self, x: np.ndarray, batch: int = 2000):
        """Local. Loss and gradient over all local samples at ``x`` (gradient copied)."""
        self.fm.load(x)
        self.fm.model.train()
        total = 0.0
        from mpidl import xp
        g = xp.zeros_like(self.fm.g)
        for a in range(0, self.n, batch):
            xb, yb = self.fm.to_device(self.x.rows(a, a + batch)), self.fm.to_device(self.y[a:a + batch])
            loss = self._loss(self.fm.model(xb), yb) * (yb.shape[0] / self.n)
            self.fm.backward(loss)
            total += float(loss.detach())
            g += self.fm.g
        return total, g

    def residual_jacobian(self, x: np.ndarray, k: int):
        """Local. (J, r, m) of step k's minibatch for the squared loss: J = d f / d w (m*C x P),
        r = f(w) - t flattened, m = batch size (Gauss-Newton surrogate of NEXT)."""
        if not self.squared:
            raise ValueError("the Gauss-Newton surrogate needs the squared loss (loss = \"squared\")")
        from torch.func import functional_call, jacrev
        self.fm.load(x)
        ix = self.indices(k)
        idx = torch.from_numpy(ix)
        xb, tb = self.x.take(ix, k), self._target(self.y[idx])
        model = self.fm.model

        def f(flat):
            return functional_call(model, self.fm.param_views(flat), (xb,)).reshape(-1)

        with torch.no_grad():
            r = (f(self.fm.params) - tb.reshape(-1)).numpy()
        J = jacrev(f)(self.fm.params.detach()).numpy()
        return J, r, len(idx)

    def indices(self, k: int) -> np.ndarray:
        """Local. Same as :func:`batch_indices`, with the epoch's permutation drawn once per epoch."""
        epoch, j = divmod(int(k), self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm[j * self.batch:(j + 1) * self.batch]

    def loss_grad(self, x: np.ndarray, k: int):
        """Local. (loss, grad) of step k's minibatch at ``x``; grad is the model's gradient buffer."""
        self.fm.load(x)
        ix = self.indices(k)
        xb, yb = self.x.take(ix, k), self.y[torch.from_numpy(ix)]
        xb, yb = self.fm.to_device(xb), self.fm.to_device(yb)  # the batch on the model's device
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
        Y = torch.as_tensor(np.asarray(Y))
        Y = Y.to(self.fm.params.dtype if self.regression else torch.long)
        total, correct = 0.0, 0
        for a in range(0, Y.shape[0], batch):
            out = self.fm.model(self.fm.to_device(as_batch(X[a:a + batch], self.fm.params.dtype)))
            yb = self.fm.to_device(Y[a:a + batch])
            total += float(self._loss(out, yb)) * yb.shape[0]
            if not self.regression:
                correct += int((out.argmax(1) == yb).sum())
        n = max(Y.shape[0], 1)
        return total / n, (float("nan") if self.regression else correct / n)
