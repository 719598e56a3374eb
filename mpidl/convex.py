"""Torch-free oracles: the Numba convex models and the minibatch order every oracle shares.

The minibatch of step k is a pure function of (seed, rank, k): epoch
``e = k // steps_per_epoch`` draws the permutation
``numpy.random.default_rng([seed, rank, e]).permutation(n)`` of this agent's
``n`` rows and step k takes the slice ``[j * batch, (j + 1) * batch)`` of it,
``j = k mod steps_per_epoch``.  Within an epoch no row is drawn twice; when
``steps_per_epoch * batch < n`` (the agreed steps per epoch come from the
smallest shard) the rest of the permutation is not reached in that epoch and
the next epoch draws a fresh permutation (docs/data.md, "Unequal shards").
"""
from __future__ import annotations

import numpy as np

__all__ = ["ConvexOracle", "batch_indices"]


def batch_indices(n: int, batch: int, steps_per_epoch: int, seed: int, rank: int, k: int) -> np.ndarray:
    """Local. Sample indices of step ``k`` (see the module docstring)."""
    epoch, j = divmod(int(k), int(steps_per_epoch))
    perm = np.random.default_rng([int(seed), int(rank), epoch]).permutation(n)
    return perm[j * batch:(j + 1) * batch]


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
