"""Small NumPy oracles shared by the stacked references and the MPI tests."""
import numpy as np

from .convex import batch_indices


class LsqOracle:
    """f_i(x) = 1/(2b) ||A_B x - b_B||^2 on minibatch B(seed, rank, k), plus a tanh
    nonlinearity option so gradients are not affine in x."""

    def __init__(self, A, b, batch, steps_per_epoch, seed=0, rank=0, nonlinear=True):
        self.A, self.b = A, b
        self.batch, self.spe, self.seed, self.rank = batch, steps_per_epoch, seed, rank
        self.dim = A.shape[1]
        self.nonlinear = nonlinear
        self._g = np.empty(self.dim)

    def loss_grad(self, x, k):
        idx = batch_indices(self.A.shape[0], self.batch, self.spe, self.seed, self.rank, k)
        return self._eval(x, self.A[idx], self.b[idx])

    def full_loss_grad(self, x):
        loss, g = self._eval(x, self.A, self.b)
        return loss, g.copy()

    def _eval(self, x, A, b):
        n = len(b)
        z = A @ x
        if self.nonlinear:
            t = np.tanh(z)
            r = t - b
            self._g[...] = A.T @ (r * (1 - t * t)) / n
        else:
            r = z - b
            self._g[...] = A.T @ r / n
        return 0.5 * float(r @ r) / n, self._g


def make_problem(n_agents, m=40, d=6, seed=0, batch=8, nonlinear=True, sizes=None):
    """Heterogeneous per-agent least-squares data; returns (oracles, x0, steps_per_epoch)."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [m] * n_agents
    spe = min(sizes) // batch
    oracles = []
    for i in range(n_agents):
        A = rng.standard_normal((sizes[i], d))
        b = np.tanh(A @ rng.standard_normal(d)) + 0.1 * rng.standard_normal(sizes[i]) + 0.2 * i
        oracles.append(LsqOracle(A, b, batch, spe, seed, i, nonlinear))
    x0 = rng.standard_normal(d) * 0.1
    return oracles, x0, spe
