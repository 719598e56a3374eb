"""Single-process stacked reference of pdADMM (plain NumPy; ALGORITHMS.md section 4).

All L layers live in one process as lists; the update order of one iteration
is p -> W -> b -> z -> q -> u, every layer "in parallel": the p update of
layer l uses q_{l-1}, u_{l-1} of the previous iteration, the q and u updates
of layer l use p_{l+1} of this iteration.  Every quantity is computed from its
definition with fresh GEMMs (no residual bookkeeping), the backtracking
evaluates the objective at each trial point, and the z / z_L / quantisation
steps use the NumPy twins of tests/reference, never the production kernels.

Row layout: p_l is (N, n_{l-1}) with p_1 = X, W_l is (n_l, n_{l-1}) (torch
Linear layout), a_l = p_l W_l^T + b_l.
"""
import numpy as np

from reference import admm_kernels as AK
from reference import quantize_kernels as QK


def relu(x):
    return np.maximum(x, 0)


def problem(dims, n=40, seed=0):
    """A small random problem (X, y, Ws, bs) with layer widths ``dims`` (float64)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, dims[0]))
    y = rng.integers(0, dims[-1], n)
    Ws = [rng.normal(0, 0.5, (dims[l + 1], dims[l])) for l in range(len(dims) - 1)]
    bs = [rng.normal(0, 0.1, dims[l + 1]) for l in range(len(dims) - 1)]
    return X, y, Ws, bs


def hyper(cfg):
    """The hyperparameters of :func:`run` from a PdADMMConfig (reads its fields only)."""
    hp = dict(nu=cfg.nu, rho=cfg.rho, mu=cfg.mu, tau0=cfg.tau0, max_doublings=cfg.max_doublings,
              fista_step=cfg.fista_step, fista_iters=cfg.fista_iters, fista_tol=cfg.fista_tol,
              quantize_p=cfg.quantize_p, rho_raise=cfg.rho_raise, rho_factor=cfg.rho_factor,
              rho_max=cfg.rho_max, rho_tol=cfg.rho_tol)
    if cfg.quantize:
        hp["quantize"] = (cfg.grid_lo, cfg.grid_hi, cfg.grid_points)
    return hp


def init(X, Ws, bs, quantize=None):
    """Forward-pass initialisation: z_l = a_l, q_l = relu(z_l) (projected when quantising),
    p_{l+1} = q_l, u_l = 0."""
    L = len(Ws)
    S = {"W": [w.copy() for w in Ws], "b": [b.copy() for b in bs], "p": [X], "z": [], "q": [], "u": []}
    for l in range(L):
        z = S["p"][l] @ S["W"][l].T + S["b"][l]
        S["z"].append(z)
        if l < L - 1:
            q = relu(z)
            if quantize is not None:
                q = QK.dequantize(QK.quantize(q, *quantize), *quantize, dtype=z.dtype)
            S["q"].append(q)
            S["u"].append(np.zeros_like(q))
            S["p"].append(q.copy())
    return S


def _gstep(f, x, g, tau0, cap):
    t, _, ok = AK.backtrack_on(f, x, g, tau0, cap)
    return (x - g / t).astype(x.dtype) if ok else x


def iterate(S, y, hp):
    """One pdADMM iteration on the stacked state ``S`` (in place); returns mean CE(z_L)."""
    nu, rho, mu = hp["nu"], hp["rho"], hp.get("mu", 0.0)
    tau0, cap = hp["tau0"], hp["max_doublings"]
    qz = hp.get("quantize")         # (lo, hi, n) or None
    L = len(S["W"])
    W, b, p, z, q, u = S["W"], S["b"], S["p"], S["z"], S["q"], S["u"]
    # p (layers 2..L), all from the previous iteration's q_{l-1}, u_{l-1}
    for l in range(1, L):
        def fp(pp, l=l):
            r = z[l] - pp @ W[l].T - b[l]
            d = pp - q[l - 1]
            return nu / 2 * np.sum(r * r) + np.sum(u[l - 1] * d) + rho / 2 * np.sum(d * d)
        g = -nu * (z[l] - p[l] @ W[l].T - b[l]) @ W[l] + u[l - 1] + rho * (p[l] - q[l - 1])
        pn = _gstep(fp, p[l], g, tau0, cap)
        if qz is not None and hp.get("quantize_p"):
            pn = QK.dequantize(QK.quantize(pn, *qz), *qz, dtype=pn.dtype)
        p[l] = pn
    for l in range(L):
        def fw(WW, l=l):
            r = z[l] - p[l] @ WW.T - b[l]
            return nu / 2 * np.sum(r * r) + mu / 2 * np.sum(WW * WW)
        G = -nu * (z[l] - p[l] @ W[l].T - b[l]).T @ p[l] + mu * W[l]
        W[l] = _gstep(fw, W[l], G, tau0, cap)
        b[l] = np.mean(z[l] - p[l] @ W[l].T, axis=0).astype(b[l].dtype)
        a = p[l] @ W[l].T + b[l]
        if l < L - 1:
            z[l] = AK.z_update(a, z[l], q[l])
        else:
            z[l], ce, _ = AK.ce_prox(a, y, z[l], nu, hp["fista_step"], hp["fista_iters"], hp["fista_tol"])
    for l in range(L - 1):
        qn = (nu * relu(z[l]) + rho * p[l + 1] + u[l]) / (nu + rho)
        if qz is not None:
            qn = QK.dequantize(QK.quantize(qn, *qz), *qz, dtype=z[l].dtype)
        q[l] = qn.astype(z[l].dtype)
        u[l] = (u[l] + rho * (p[l + 1] - q[l])).astype(u[l].dtype)
    return float(np.mean(ce))


def raise_rho(costs, rho, factor=10.0, rho_max=1.0, tol=0.01):
    """rho * factor (capped at rho_max) when the cost fell by < tol in each of the last two iterations."""
    if len(costs) >= 3 and costs[-3] - costs[-2] < tol and costs[-2] - costs[-1] < tol:
        return min(rho * factor, rho_max)
    return rho


def run(X, y, Ws, bs, hp, iters):
    """``iters`` iterations from the forward-pass start; returns (state, costs, rhos)."""
    hp = dict(hp)
    S = init(X, Ws, bs, hp.get("quantize"))
    costs, rhos = [], []
    for _ in range(iters):
        rhos.append(hp["rho"])
        costs.append(iterate(S, y, hp))
        if hp.get("rho_raise"):
            hp["rho"] = raise_rho(costs, hp["rho"], hp.get("rho_factor", 10.0), hp.get("rho_max", 1.0),
                                  hp.get("rho_tol", 0.01))
    return S, costs, rhos


def augmented_lagrangian(S, y, nu, rho, mu=0.0):
    """CE(z_L) + (nu/2) sum ||z_l - a_l||^2 + (nu/2) sum_{l<L} ||q_l - relu z_l||^2
    + sum_{l<L} <u_l, p_{l+1} - q_l> + (rho/2) ||p_{l+1} - q_l||^2 + (mu/2) sum ||W_l||^2 (float64)."""
    L = len(S["W"])
    W = [w.astype(np.float64) for w in S["W"]]
    zL = S["z"][-1].astype(np.float64)
    m = zL.max(axis=1)
    total = float(np.sum(m + np.log(np.exp(zL - m[:, None]).sum(axis=1)) - zL[np.arange(len(y)), y]))
    for l in range(L):
        p = S["p"][l].astype(np.float64)
        r = S["z"][l] - p @ W[l].T - S["b"][l]
        total += nu / 2 * np.sum(r * r) + mu / 2 * np.sum(W[l] ** 2)
        if l < L - 1:
            qq = S["q"][l].astype(np.float64)
            d = S["p"][l + 1] - qq
            total += nu / 2 * np.sum((qq - relu(S["z"][l])) ** 2) + np.sum(S["u"][l] * d) + rho / 2 * np.sum(d * d)
    return total


def forward(X, Ws, bs):
    """Logits of the MLP x -> relu(x W_1^T + b_1) -> ... -> W_L h + b_L."""
    h = X
    for l, (w, b) in enumerate(zip(Ws, bs)):
        h = h @ w.T + b
        if l < len(Ws) - 1:
            h = relu(h)
    return h
