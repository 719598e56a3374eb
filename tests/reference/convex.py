"""An independent convex oracle (plain NumPy): logistic regression and least squares.

Written from the math, not from mpidl.oracles.ConvexOracle or the kernels:
logistic with labels y in {0, 1} and margins z = X w,
    f(w) = mean( log(1 + e^z) - y z ),   grad f(w) = X^T (sigmoid(z) - y) / m
least squares
    f(w) = ||X w - y||^2 / (2m),          grad f(w) = X^T (X w - y) / m
The minibatch of step k follows the documented rule: epoch e = k // spe takes the
permutation default_rng([seed, rank, e]).permutation(n), step k the slice (k mod spe) * b.
"""
import numpy as np


def batch_indices(n, batch, steps_per_epoch, seed, rank, k):
    epoch, j = k // steps_per_epoch, k % steps_per_epoch
    return np.random.default_rng([seed, rank, epoch]).permutation(n)[j * batch:(j + 1) * batch]


def logistic(w, X, y):
    z = X @ w
    loss = np.mean(np.logaddexp(0.0, z) - y * z)
    sig = 0.5 * (1.0 + np.tanh(0.5 * z))          # sigmoid(z), overflow-free
    return float(loss), X.T @ (sig - y) / len(y)


def lsq(w, X, y):
    r = X @ w - y
    return float(r @ r / (2 * len(y))), X.T @ r / len(y)


class ConvexRef:
    """loss_grad(w, k) / full_loss_grad(w) / residual_jacobian(w, k) / evaluate(w, X, y)."""

    def __init__(self, X, y, kind="logistic", batch_size=0, steps_per_epoch=1, seed=0, rank=0):
        self.X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        self.y = np.asarray(y, dtype=np.float64)
        self.kind, self.batch, self.spe, self.seed, self.rank = kind, batch_size, steps_per_epoch, seed, rank
        self.n, self.dim = self.X.shape
        self.f = logistic if kind == "logistic" else lsq

    def _rows(self, k):
        if self.batch <= 0:
            return self.X, self.y
        idx = batch_indices(self.n, self.batch, self.spe, self.seed, self.rank, k)
        return self.X[idx], self.y[idx]

    def loss_grad(self, w, k):
        return self.f(np.asarray(w, dtype=np.float64), *self._rows(k))

    def full_loss_grad(self, w):
        return self.f(np.asarray(w, dtype=np.float64), self.X, self.y)

    def residual_jacobian(self, w, k):
        X, y = self._rows(k)
        return X, X @ w - y, len(y)

    def evaluate(self, w, X, y):
        X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        y = np.asarray(y, dtype=np.float64)
        loss, _ = self.f(np.asarray(w, dtype=np.float64), X, y)
        if self.kind != "logistic":
            return loss, float("nan")
        return loss, float(np.mean((X @ w > 0) == (y > 0.5)))
