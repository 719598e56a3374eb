"""Stacked-matrix reference of NEXT (rows = agents), straight from ALGORITHMS.md section 1."""
import numpy as np


def soft(v, t):
    return np.sign(v) * np.maximum(np.abs(v) - t, 0.0)


def linearized(w, g, pi, tau, reg, lam):
    """Closed-form surrogate minimiser (full linearisation + proximal term)."""
    if reg == "l2":
        return (tau * w - g - pi) / (tau + 2 * lam)
    if reg == "l1":
        return soft(w - (g + pi) / tau, lam / tau)
    return w - (g + pi) / tau


def gauss_newton_exact(w, J, r, pi, tau, reg, lam, m):
    """Exact minimiser of 1/(2m)||r + J d||^2 + pi^T d + tau/2 ||d||^2 + lam ||w + d||^2 (l2/none)."""
    lam2 = 2 * lam if reg == "l2" else 0.0
    A = J.T @ J / m + (tau + lam2) * np.eye(len(w))
    b = -(J.T @ r / m + pi + lam2 * w)
    return w + np.linalg.solve(A, b)


def gauss_newton_block_jacobi(w, J, r, pi, tau, reg, lam, m, blocks):
    """The block-Jacobi Gauss-Newton surrogate: each contiguous column block (np.array_split) solved
    exactly with the other blocks frozen at w (cross-curvature between blocks dropped)."""
    out = np.empty_like(w)
    for idx in np.array_split(np.arange(len(w)), blocks):
        out[idx] = gauss_newton_exact(w[idx], J[:, idx], r, pi[idx], tau, reg, lam, m)
    return out


def next_stacked(W, x0, oracles, steps, tau, alpha0, eps, reg, lam, surrogate="linear", trace=None,
                 blocks=1):
    """Run NEXT for all agents at once; ``trace(k, X, Y, G)`` is called after every iteration.
    ``blocks`` > 1: the block-Jacobi Gauss-Newton surrogate over that many column blocks."""
    N = len(oracles)
    X = np.tile(np.asarray(x0, float), (N, 1))
    G = np.stack([o.loss_grad(X[i].copy(), 0)[1].copy() for i, o in enumerate(oracles)])
    Y = G.copy()
    alpha = alpha0
    for k in range(steps):
        Pi = N * Y - G
        if surrogate == "linear":
            Wt = np.stack([linearized(X[i], G[i], Pi[i], tau, reg, lam) for i in range(N)])
        else:
            rows = []
            for i, o in enumerate(oracles):
                J, r, m = o.residual_jacobian(X[i].copy(), k)
                rows.append(gauss_newton_block_jacobi(X[i], J, r, Pi[i], tau, reg, lam, m, blocks))
            Wt = np.stack(rows)
        Z = X + alpha * (Wt - X)
        X = W @ Z
        Y = W @ Y
        Gn = np.stack([o.loss_grad(X[i].copy(), k + 1)[1].copy() for i, o in enumerate(oracles)])
        Y = Y + Gn - G
        G = Gn
        alpha = alpha * (1 - eps * alpha)
        if trace is not None:
            trace(k, X, Y, G)
    return X, Y


def fista(grad_F, L, x0, reg, lam, iters=20000, tol=1e-15):
    """Centralized minimiser of F(w) + r(w) by FISTA (independent of NEXT)."""
    x = y = np.asarray(x0, float).copy()
    t = 1.0
    for _ in range(iters):
        v = y - grad_F(y) / L
        if reg == "l1":
            xn = soft(v, lam / L)
        elif reg == "l2":
            xn = v / (1 + 2 * lam / L)
        else:
            xn = v
        tn = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = xn + (t - 1) / tn * (xn - x)
        if np.linalg.norm(xn - x) <= tol * max(1.0, np.linalg.norm(x)):
            return xn
        x, t = xn, tn
    return x
