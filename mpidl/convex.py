"""Torch-free oracles: the Numba convex models and the minibatch order every oracle shares.

The minibatch of step k is a pure function of (seed, rank, k): epoch
``e = k // steps_per_epoch`` draws the permutation
``numpy.random.default_rng([seed, rank, e]).permutation(n)`` of this agent's
``n`` rows and step k takes the slice ``[j * batch, (j + 1) * batch)`` of it,
``j = k mod steps_per_epoch``.  Within an epoch no row is drawn twice; when
``steps_per_epoch * batch < n`` (the agreed steps per epoch come from the
smallest shard) the rest of the permutation is not reached in that epoch and
the next epoch draws a fresh permutation (docs/data.md, "Unequal shards").

``shuffle = "block"`` ([data] shuffle) draws the epoch's permutation so that it
suits chunked storage (:class:`Order`): the rows are cut into contiguous blocks
of ``block`` rows, the same generator permutes the blocks, and the rows of each
run of ``buffer`` consecutive blocks (in that order) are permuted among
themselves.  A batch then touches at most ``2 * buffer`` blocks (it may span two
runs), and a reader that keeps the last ``2 * buffer`` blocks it read reads each
block once per epoch.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ConvexOracle", "batch_indices", "Order", "SHUFFLES"]

SHUFFLES = ("global", "block")


def epoch_permutation(n: int, seed: int, rank: int, epoch: int, shuffle: str = "global", block: int = 1,
                      buffer: int = 1) -> np.ndarray:
    """Local. The order of this agent's ``n`` rows in ``epoch`` (see the module docstring)."""
    rng = np.random.default_rng([int(seed), int(rank), int(epoch)])
    if shuffle == "global":
        return rng.permutation(n)
    if shuffle != "block":
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
    block, buffer = max(1, int(block)), max(1, int(buffer))
    nb = -(-n // block)
    order = rng.permutation(nb)
    parts = []
    for g in range(0, nb, buffer):
        rows = np.concatenate([np.arange(b * block, min(n, (b + 1) * block)) for b in order[g:g + buffer]])
        parts.append(rows[rng.permutation(len(rows))])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def batch_indices(n: int, batch: int, steps_per_epoch: int, seed: int, rank: int, k: int,
                  shuffle: str = "global", block: int = 1, buffer: int = 1) -> np.ndarray:
    """Local. Sample indices of step ``k`` (see the module docstring)."""
    epoch, j = divmod(int(k), int(steps_per_epoch))
    perm = epoch_permutation(n, seed, rank, epoch, shuffle, block, buffer)
    return perm[j * batch:(j + 1) * batch]


class Order:
    """Local. The batches of one agent: :func:`batch_indices` with the epoch's permutation kept.

    Thread-safe (a prefetching reader and the training loop may both ask).
    """

    def __init__(self, n, batch, steps_per_epoch, seed=0, rank=0, shuffle="global", block=1, buffer=1):
        import threading
        self.n, self.batch, self.spe = int(n), int(batch), int(steps_per_epoch)
        self.seed, self.rank, self.shuffle = int(seed), int(rank), str(shuffle)
        self.block, self.buffer = max(1, int(block)), max(1, int(buffer))
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
        self._lock = threading.Lock()
        self._perm, self._epoch = None, None

    def indices(self, k: int) -> np.ndarray:
        """Local. Positions of step ``k``'s batch."""
        epoch, j = divmod(int(k), self.spe)
        with self._lock:
            if epoch != self._epoch:
                self._perm = epoch_permutation(self.n, self.seed, self.rank, epoch, self.shuffle, self.block,
                                               self.buffer)
                self._epoch = epoch
            perm = self._perm
        return perm[j * self.batch:(j + 1) * self.batch]


class ConvexOracle:
    """Local. Numba convex oracle: logistic regression or least squares on (X, y).

    ``kind="logistic"``: f(w) = mean log(1 + exp(-s x^T w)), labels y in {0, 1}
    mapped to s in {-1, +1}; ``kind="lsq"``: f(w) = ||X w - y||^2 / (2m).
    ``batch_size = 0`` means full batch (deterministic NEXT); otherwise the
    minibatch of step k follows :func:`batch_indices`.  ``blocks > 1`` uses the
    row-block prange kernels.
    """

    def __init__(self, X, y, kind="logistic", *, batch_size=0, steps_per_epoch=1, seed=0, rank=0,
                 blocks=1, shuffle="global", block=1, buffer=1):
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
        self.order = Order(self.n, self.batch, self.spe, self.seed, self.rank, shuffle, block, buffer) \
            if self.batch > 0 else None

    def _eval(self, w, X, t, out):
        K = self.K
        if self.kind == "logistic":
            return K.logistic_blocks(w, X, t, self.blocks, out) if self.blocks > 1 else K.logistic(w, X, t, out)
        return (K.least_squares_blocks(w, X, t, self.blocks, out) if self.blocks > 1
                else K.least_squares(w, X, t, out))

    def indices(self, k):
        if self.batch <= 0:
            return None
        return self.order.indices(k)

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
