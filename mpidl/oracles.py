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


def batch_indices(n: int, batch: int, steps_per_epoch: int, seed: int, rank: int, k: int) -> np.ndarray:
    """Local. Sample indices of step ``k`` (see the module docstring)."""
    epoch, j = divmod(int(k), int(steps_per_epoch))
    perm = np.random.default_rng([int(seed), int(rank), epoch]).permutation(n)
    return perm[j * batch:(j + 1) * batch]


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
        g = np.zeros(self.dim, dtype=self.fm.g.dtype)
        for a in range(0, self.n, batch):
            xb, yb = self.x.rows(a, a + batch), self.y[a:a + batch]
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
            out = self.fm.model(as_batch(X[a:a + batch], self.fm.params.dtype))
            yb = Y[a:a + batch]
            total += float(self._loss(out, yb)) * yb.shape[0]
            if not self.regression:
                correct += int((out.argmax(1) == yb).sum())
        n = max(Y.shape[0], 1)
        return total / n, (float("nan") if self.regression else correct / n)


class ConvexOracle:
    """Local. Numba convex oracle: logistic regression or least squares on (X, y).

    ``kind="logistic"``: f(w) = mean log(1 + exp(-s x^T w)), labels y in {0, 1}
    mapped to s in {-1, +1}; ``kind="lsq"``: f(w) = ||X w - y||^2 / (2m).
    ``batch_size = 0`` means full batch (deterministic NEXT); otherwise the
    minibatch of step k follows :func:`batch_indices`.  ``blocks > 1`` uses the
    row-block prange kernels.
    """

    def __init__(self, X, y, kind="logistic", *, batch_size=0, steps_per_epoch=1, seed=0, rank=0,
                 blocks=1):
        from mpidl import kernels as K
        self.K = K
        self.kind = kind
        self.X = np.ascontiguousarray(X, dtype=np.float64).reshape(len(X), -1)
        y = np.asarray(y, dtype=np.float64)
        self.t = (2.0 * y - 1.0) if kind == "logistic" else y
        self.n, self.dim = self.X.shape
        self.batch = int(batch_size)
        self.spe, self.seed, self.rank, self.blocks = int(steps_per_epoch), int(seed), int(rank), int(blocks)
        self._g = np.empty(self.dim)
        self.last_correct = 0.0

    def _eval(self, w, X, t, out):
        K = self.K
        if self.kind == "logistic":
            return K.logistic_blocks(w, X, t, self.blocks, out) if self.blocks > 1 else K.logistic(w, X, t, out)
        return (K.least_squares_blocks(w, X, t, self.blocks, out) if self.blocks > 1
                else K.least_squares(w, X, t, out))

    def indices(self, k):
        if self.batch <= 0:
            return None
        return batch_indices(self.n, self.batch, self.spe, self.seed, self.rank, k)

    def loss_grad(self, x, k):
        idx = self.indices(k)
        X, t = (self.X, self.t) if idx is None else (self.X[idx], self.t[idx])
        w = np.asarray(x, dtype=np.float64)
        loss, g = self._eval(w, X, t, self._g)
        if self.kind == "logistic":
            self.last_correct = float(np.mean(np.sign(X @ w) == t))
        return loss, g

    def full_loss_grad(self, x):
        loss, g = self._eval(np.asarray(x, dtype=np.float64), self.X, self.t, np.empty(self.dim))
        return loss, g

    def residual_jacobian(self, x, k):
        if self.kind != "lsq":
            raise ValueError("the Gauss-Newton surrogate needs the squared loss (kind='lsq')")
        idx = self.indices(k)
        X, t = (self.X, self.t) if idx is None else (self.X[idx], self.t[idx])
        return X, X @ x - t, X.shape[0]

    def evaluate(self, x, X, Y):
        X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        Y = np.asarray(Y, dtype=np.float64)
        t = (2.0 * Y - 1.0) if self.kind == "logistic" else Y
        loss, _ = self._eval(np.asarray(x, dtype=np.float64), X, t, np.empty(self.dim))
        acc = float(np.mean(np.sign(X @ x) == t)) if self.kind == "logistic" else float("nan")
        return loss, acc
