"""NEXT: in-network nonconvex optimisation with convex surrogates and gradient tracking.

Di Lorenzo & Scutari, "NEXT: In-Network Nonconvex Optimization", arXiv
1602.00591; for neural networks: Scardapane & Di Lorenzo, arXiv 1610.07448.
Social problem  min_w  sum_i g_i(w) + r(w),  r = lam ||w||_1, lam ||w||^2 or 0.
Agent i, iteration k (ALGORITHMS.md section 1):

1. pi_i = N y_i - grad g_i(w_i)
2. w~_i = argmin_w g~_i(w; w_i) + pi_i^T (w - w_i) + r(w)           (local surrogate)
     * ``surrogate="linear"``: g~_i = grad g_i(w_i)^T (w - w_i) + (tau/2)||w - w_i||^2,
       closed form (kernels.linearized_step, block-parallel over C blocks)
     * ``surrogate="gauss-newton"`` (squared loss): linearise the model output,
       keep the loss, add (tau/2)||w - w_i||^2 (kernels.gn_solve: CG, or FISTA for l1)
3. z_i = w_i + alpha_k (w~_i - w_i)
4. [w_i, y_i] <- sum_j W_ij [z_j, y_j]     (ONE neighbour collective: w and y are two
   halves of one buffer, so the pair is mixed in place without packing copies)
5. y_i <- y_i + grad g_i(w_i new) - grad g_i(w_i old)                 (gradient tracking)
6. alpha_{k+1} = alpha_k (1 - eps alpha_k)

y_i(0) = grad g_i(w_i(0)), so mean_i y_i = mean_i grad g_i(w_i) at every iteration
(W doubly stochastic).  Gradients with a minibatch oracle are those of step k's
batch; with a full-batch oracle this is exactly NEXT.  ``threads_per_agent``
sets Numba's thread count for the block-parallel surrogate ("parallel inside
each agent").  The stacked-matrix reference is tests/reference/next.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mpidl import kernels as K
from mpidl.config import register_algorithm

__all__ = ["NEXTConfig", "NEXT", "NEXTState"]


@dataclass(frozen=True)
class NEXTConfig:
    MODEL_FORM = "NEXT trains its own model forms (the convex models convex-logistic / convex-lsq, or the built-in mlp with its Gauss-Newton surrogate)"  # no [model] factory (a class attribute, not a config key)
    name: str = "next"
    tau: float = 1.0                    # proximal weight of the surrogate
    alpha0: float = 0.5                 # alpha_0 in (0, 1]
    eps: float = 0.01                   # alpha_k = alpha_{k-1} (1 - eps alpha_{k-1}), eps in (0, 1)
    reg: str = "l2"                     # l2 | l1 | none
    lam: float = 1e-4                   # regularisation weight
    surrogate: str = "linear"           # linear | gauss-newton
    inner_iters: int = 50               # Gauss-Newton inner loop bound (CG / FISTA steps)
    inner_tol: float = 1e-8
    threads_per_agent: int = 1          # Numba threads for the block-parallel surrogate
    blocks: int = 0                     # surrogate blocks C (0 = threads_per_agent)

    def validate(self):
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 0 < self.alpha0 <= 1:
            raise ValueError(f"alpha0 must lie in (0, 1], got {self.alpha0}")
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must lie in [0, 1), got {self.eps}")
        if self.reg not in ("l1", "l2", "none"):
            raise ValueError(f"reg must be l1, l2 or none, got {self.reg!r}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.surrogate not in ("linear", "gauss-newton"):
            raise ValueError(f"surrogate must be linear or gauss-newton, got {self.surrogate!r}")
        if not self.inner_tol >= 0:
            raise ValueError(f"inner_tol must be >= 0, got {self.inner_tol}")
        for key, lo in (("threads_per_agent", 1), ("blocks", 0), ("inner_iters", 0)):
            if getattr(self, key) < lo:
                raise ValueError(f"{key} must be >= {lo}, got {getattr(self, key)}")


@dataclass
class NEXTState:
    wy: np.ndarray          # [w_i, y_i] in one buffer (2P): mixed together by one collective
    g: np.ndarray           # grad g_i(w_i) of the last evaluation
    alpha: float
    ready: bool = False     # y and g initialised (first step evaluates grad g_i(w_i(0)))

    @property
    def x(self):
        return self.wy[: self.g.shape[0]]

    @property
    def y(self):
        return self.wy[self.g.shape[0]:]


class NEXT:
    state_cls = NEXTState
    resize_note = ("NEXT's tracking variables y and gradients g restart from their averages, which keeps "
                   "mean y = mean g but is not the exact continuation")

    def __init__(self, cfg: NEXTConfig, **_):
        self.cfg = cfg
        self.name = cfg.name
        self.blocks = cfg.blocks or cfg.threads_per_agent

    def init(self, x0, comm):
        """Local. w = x0 (copied into the packed buffer); y and g are set at the first step."""
        K.set_threads(self.cfg.threads_per_agent)
        p = x0.shape[0]
        wy = np.zeros(2 * p, dtype=x0.dtype)
        wy[:p] = x0
        self.N = comm.size
        self._pi = np.empty_like(x0)
        self._wt = np.empty_like(x0)
        return NEXTState(wy=wy, g=np.zeros_like(x0), alpha=float(self.cfg.alpha0))

    def _surrogate(self, oracle, w, g, pi, alpha, k):
        """Local. Writes z into w (in place) and returns the iterations used."""
        c = self.cfg
        if c.surrogate == "linear":
            if self.blocks > 1:
                K.linearized_step_blocks(w, g, pi, c.tau, alpha, c.reg, c.lam, self.blocks,
                                         out_wt=self._wt, out_z=w)
            else:
                K.linearized_step(w, g, pi, c.tau, alpha, c.reg, c.lam, out_wt=self._wt, out_z=w)
            return 0
        J, r, m = oracle.residual_jacobian(w, k)
        if self.blocks > 1:
            _, its = K.gn_solve_blocks(w, J, r, pi, c.tau, c.reg, c.lam, m, self.blocks,
                                       c.inner_iters, c.inner_tol, out=self._wt)
            its = int(np.max(its))
        else:
            _, its = K.gn_solve(w, J, r, pi, c.tau, c.reg, c.lam, m, c.inner_iters, c.inner_tol,
                                out=self._wt)
        K.relax(w, self._wt, alpha, out=w)
        return its

    def step(self, k, state, oracle, comm):
        """Collective (one neighbour collective: the packed [z, y] mix)."""
        p = state.g.shape[0]
        w, y, g = state.wy[:p], state.wy[p:], state.g
        if not state.ready:
            _, g0 = oracle.loss_grad(w, k)
            g[...] = g0
            y[...] = g0
            state.ready = True
        pi = self._pi
        np.multiply(y, self.N, out=pi)
        pi -= g
        its = self._surrogate(oracle, w, g, pi, state.alpha, k)
        comm.mix(state.wy, out=state.wy)
        loss, g_new = oracle.loss_grad(w, k + 1)
        y += g_new
        y -= g
        g[...] = g_new
        state.alpha = state.alpha * (1.0 - self.cfg.eps * state.alpha)
        return state, {"loss": loss, "inner_iters": its}

    # -- metrics of the social problem (Collective) -------------------------
    def social_metrics(self, state, oracle, comm) -> dict:
        """Collective. Objective, stationarity, consensus and tracking errors at the average.

        objective  U(w_bar) = sum_i g_i(w_bar) + r(w_bar)  (full local data)
        stationarity  ||w_bar - prox_{r/L}(w_bar - grad F(w_bar) / L)|| * L,  L = tau
        consensus  sqrt(mean_i ||w_i - w_bar||^2);  tracking ||mean y - mean grad g_i(w_i)||
        """
        c = self.cfg
        p = state.g.shape[0]
        w, y = state.wy[:p], state.wy[p:]
        both = comm.allreduce(np.concatenate([w, y, state.g]).astype(np.float64), op="mean")
        wbar, ybar, gbar = both[:p], both[p:2 * p], both[2 * p:]
        loss_i, grad_i = oracle.full_loss_grad(wbar.astype(w.dtype))
        tot = comm.allreduce(np.concatenate([[loss_i], grad_i.astype(np.float64),
                                             [float(np.sum((w - wbar) ** 2))]]))
        F, gF, cons2 = tot[0], tot[1:p + 1], tot[p + 1] / comm.size
        r = c.lam * (np.abs(wbar).sum() if c.reg == "l1" else (wbar @ wbar if c.reg == "l2" else 0.0))
        L = c.tau
        v = wbar - gF / L
        if c.reg == "l1":
            prox = np.sign(v) * np.maximum(np.abs(v) - c.lam / L, 0.0)
        elif c.reg == "l2":
            prox = v / (1.0 + 2.0 * c.lam / L)
        else:
            prox = v
        return {"objective": float(F + r), "stationarity": float(L * np.linalg.norm(wbar - prox)),
                "consensus_error": math.sqrt(cons2), "tracking_error": float(np.linalg.norm(ybar - gbar)),
                "sparsity": float(np.mean(wbar == 0.0)), "alpha": state.alpha}


register_algorithm("next", NEXTConfig, NEXT)
