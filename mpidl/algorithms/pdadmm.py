"""pdADMM: layer-parallel gradient-free ADMM for an MLP (and its quantised variant pdADMM-G-Q).

Wang, Chai, Cheng, Zhao, "Toward Model Parallelism for Deep Neural Network
based on Gradient-free ADMM Framework", arXiv 2009.02868 (pdADMM); quantised
follow-up arXiv 2105.09837 (pdADMM-G-Q).  ALGORITHMS.md section 4.

Problem (L layers, row layout: one row per sample, p_1 = X, a_l = p_l W_l^T + b_l)

    min  CE(z_L; y) + (nu/2) sum_l ||z_l - a_l||^2 + (nu/2) sum_{l<L} ||q_l - relu(z_l)||^2
         + (mu/2) sum_l ||W_l||^2
    s.t. p_{l+1} = q_l,   augmented with  <u_l, p_{l+1} - q_l> + (rho/2)||p_{l+1} - q_l||^2.

One iteration, every layer at once (layer l reads q_{l-1}, u_{l-1} of the
previous iteration and p_{l+1} of this one):

    p_l (l >= 2): g = -nu R_l W_l + u_{l-1} + rho (p_l - q_{l-1}),  R_l = z_l - a_l;
                  p_l <- p_l - g / t, t by bounded backtracking from tau0
                  (kernels.admm.backtrack with g^T H g = nu ||g W^T||^2 + rho ||g||^2)
                  [pdadmm-q with quantize_p: p_l projected onto the grid]
    W_l:          G = -nu R_l^T p_l + mu W_l;  W_l <- W_l - G / t  (same backtracking,
                  g^T H g = nu ||p G^T||^2 + mu ||G||^2)
    b_l:          b_l <- mean over samples of (z_l - p_l W_l^T)          (exact)
    z_l (l < L):  two-branch elementwise minimiser (kernels.admm.z_update)
    z_L:          row-wise bounded FISTA on CE(z; y) + (nu/2)||z - a_L||^2 (kernels.admm.ce_prox)
    q_l (l < L):  (nu relu z_l + rho p_{l+1} + u_l) / (nu + rho)   [pdadmm-q: onto the grid]
    u_l (l < L):  u_l + rho (p_{l+1} - q_l)

Implicit dual (unquantised runs): after every q/u update u_l = nu (q_l - relu z_l)
holds exactly, so u_l is not stored.  The z kernel leaves u_l = nu (q_l - relu z_l^old)
in q_l's buffer for the q update (kernels.admm.z_step_dual), the p update of layer
l + 1 forms u_l from q_l and z_l (kernels.admm.p_grad_dual), and only the rank
right of a block boundary keeps a stored copy u_in of its neighbour's u (it has
no z of that layer).  Quantised runs store u (the projection breaks the identity).

Bookkeeping: the residual R_l = z_l - a_l is part of the state (a_l is never
formed).  No N x width scratch: on wide layers (n_in <= n_out) G = R W of the p
step is written over R's storage in row blocks, the curvatures come from the Gram
matrices (||G W^T||^2 = <G^T G, W^T W>, ||p G^T||^2 = <G p^T p, G>, X^T X once) and
R is recomputed by one GEMM after the step; narrow layers keep S = G W^T / p G^T
(N x n_out, small) and update R += S / t (the p step then takes two passes over
row blocks).

Layer parallelism: ranks own contiguous blocks of layers on a path (waits sleep
between tests of the messages, ``wait_poll_us``, instead of spinning on a core).  Per
iteration a rank sends p of its first layer to the previous rank (started right
after the p update, so it overlaps the W/b/z updates) and q of its last layer
to the next rank.  u_l is NOT sent: the right-hand neighbour of a boundary applies
``u_update`` to p_{l+1} and q_l, which are exchanged bitwise (the left-hand rank
does the same in quantised runs, so the copies stay bitwise equal; unquantised,
it uses the implicit u_l, equal up to rounding).  Quantised runs send grid indices (uint16 for 1000
points), never floats.

Quantised storage: q_l (and p_l with ``quantize_p``) live on the grid, so the
state holds them as grid indices (uint16 for 1000 points: half the bytes of
float32), and the messages are views of the state.  Wherever a float value is
needed (GEMMs, elementwise kernels) the rows are dequantised block by block
(``_QROWS`` rows) into small buffers; no N x width float copy of q or p exists.
The elementwise results are bitwise those of the float storage; the reductions
over samples with an indexed p (R^T p, p^T p) are summed block by block, so
they differ from one full GEMM by rounding (checked against the reference).  Option ``rho_raise``: rho <- min(10 rho, rho_max) when
the mean CE(z_L) fell by < rho_tol in each of the last two iterations (the
public code's schedule; the cost is broadcast from the last rank).

The stacked single-process reference is tests/reference/pdadmm.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mpidl.kernels import admm as KA
from mpidl.kernels import quantize as KQ
from mpidl.kernels.threads import block_bounds, set_threads

__all__ = ["PdADMMConfig", "PdADMMQConfig", "PdADMM", "PdADMMState", "layer_blocks"]

_TAG_P, _TAG_Q, _TAG_INIT = 11, 12, 13


@dataclass(frozen=True)
class PdADMMConfig:
    MODEL_FORM = "pdADMM trains its own layer-split MLP (set [model] hidden)"  # no [model] factory (a class attribute, not a config key)
    name: str = "pdadmm"
    rho: float = 1e-4                   # penalty of p_{l+1} = q_l
    nu: float = 1e-4                    # weight of the layer-fit terms
    mu: float = 0.0                     # weight decay (mu/2)||W||^2
    tau0: float = 10.0                  # first curvature tried by backtracking (p and W)
    max_doublings: int = 10             # backtracking cap; a step that never passes is skipped
    fista_iters: int = 50               # z_L: FISTA steps per row at most
    fista_tol: float = 1e-6             # z_L: stop a row when its objective changes by <= tol
    fista_step: float = 1.0             # z_L: FISTA step (<= 2)
    quantize: bool = False              # project q onto the grid, send grid indices
    quantize_p: bool = False            # also project p (needs quantize); p crosses the wire as indices
    grid_lo: float = -1.0
    grid_hi: float = 2.0
    grid_points: int = 1000
    rho_raise: bool = False             # rho <- min(rho_factor rho, rho_max) on a stalled cost
    rho_factor: float = 10.0
    rho_max: float = 1.0
    rho_tol: float = 0.01
    init: str = "torch"                 # torch (the MLP's seeded init) | normal (N(0, init_std), as the public code)
    init_std: float = 0.1
    downsample: int = 1                 # average-pool images by this factor (2: 28x28 -> 14x14)
    threads_per_rank: int = 1           # Numba and BLAS threads of each layer rank
    wait_poll_us: float = 100.0         # wait for messages by testing every this many microseconds and
                                        # sleeping in between (0: MPI's blocking wait, which spins in MPICH)

    def validate(self):
        for key in ("rho", "nu", "tau0", "fista_step", "rho_factor", "rho_max", "init_std"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("mu", "fista_tol", "rho_tol"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.fista_step > 2:
            raise ValueError(f"fista_step must be <= 2 (softmax-CE curvature <= 1/2), got {self.fista_step}")
        if not self.wait_poll_us >= 0:
            raise ValueError(f"wait_poll_us must be >= 0, got {self.wait_poll_us}")
        for key, lo in (("max_doublings", 0), ("fista_iters", 0), ("threads_per_rank", 1), ("downsample", 1)):
            if getattr(self, key) < lo:
                raise ValueError(f"{key} must be >= {lo}, got {getattr(self, key)}")
        if self.init not in ("torch", "normal"):
            raise ValueError(f"init must be torch or normal, got {self.init!r}")
        if self.quantize_p and not self.quantize:
            raise ValueError("quantize_p needs quantize = true")
        try:  # checked even when quantize is off, so a bad grid never waits for the day it is used
            KQ.check_grid(self.grid_lo, self.grid_hi, self.grid_points)
        except (ValueError, TypeError) as e:
            raise ValueError(f"quantization grid (grid_lo, grid_hi, grid_points) cannot hold the "
                             f"values: {e}") from None
        if self.quantize:
            if not self.grid_lo <= 0.0 < self.grid_hi:
                raise ValueError(f"quantization grid [{self.grid_lo}, {self.grid_hi}] cannot hold the "
                                 "layer outputs q ~ relu(z) >= 0: it needs grid_lo <= 0 < grid_hi")


@dataclass(frozen=True)
class PdADMMQConfig(PdADMMConfig):
    """pdADMM-G-Q: the same fields, quantisation on by default."""
    name: str = "pdadmm-q"
    quantize: bool = True


@dataclass
class PdADMMState:
    """This rank's block of layers; every array is the concatenation over its layers."""
    W: np.ndarray
    b: np.ndarray
    z: np.ndarray
    R: np.ndarray           # z_l - p_l W_l^T - b_l
    p: np.ndarray           # p_l of the block's layers l >= 2
    q: np.ndarray           # q_l of the block's layers l < L
    u: np.ndarray           # u_l of the block's layers l < L (quantised runs; empty when implicit)
    q_in: np.ndarray        # q_{l0-1} received from the previous rank (empty on rank 0)
    u_in: np.ndarray        # this rank's copy of u_{l0-1}
    tau_p: np.ndarray       # last tried backtracking curvature per layer (p)
    tau_W: np.ndarray       # last tried backtracking curvature per layer (W)
    rejected: np.ndarray    # backtracking steps skipped (cap reached), per layer: [p, W]
    costs: np.ndarray       # last three mean CE(z_L) (rho_raise); NaN = not yet
    rho: float = 1e-4
    loss: float = float("nan")


def layer_blocks(n_layers: int, n_ranks: int):
    """Local. Contiguous layer blocks [l0, l1) per rank (the first L mod P ranks get one more)."""
    if n_ranks > n_layers:
        raise ValueError(f"pdADMM needs at most one rank per layer: {n_ranks} ranks for {n_layers} layers")
    b = block_bounds(n_layers, n_ranks)
    return [(int(b[r]), int(b[r + 1])) for r in range(n_ranks)]


@dataclass
class _Layer:
    l: int                  # global index (0-based)
    W: np.ndarray
    b: np.ndarray
    z: np.ndarray
    R: np.ndarray
    p: np.ndarray           # input (X for l == 0)
    q: np.ndarray = None
    u: np.ndarray = None


class PdADMM:
    """Local per-rank math + the path messages of one layer block (see the module docstring)."""

    state_cls = PdADMMState

    def __init__(self, cfg: PdADMMConfig, *, dims, n_samples, rank, size, dtype=np.float32, X=None, y=None, **_):
        cfg.validate()
        self.cfg, self.name = cfg, cfg.name
        self.dims = [int(d) for d in dims]          # n_0 (input), n_1, ..., n_L
        self.L = len(self.dims) - 1
        self.N = int(n_samples)
        self.rank, self.size = int(rank), int(size)
        self.dtype = np.dtype(dtype)
        self.l0, self.l1 = layer_blocks(self.L, self.size)[self.rank]
        self.X, self.y = X, y
        self.grid = (cfg.grid_lo, cfg.grid_hi, cfg.grid_points) if cfg.quantize else None
        self.implicit_u = not cfg.quantize          # u_l = nu (q_l - relu z_l), not stored
        # quantised runs store q (and q_in) as grid indices, p too with quantize_p
        self.idx_dtype = KQ.index_dtype(cfg.grid_points) if cfg.quantize else None
        self.times = {k: 0.0 for k in ("p", "W", "b", "z", "q", "u", "wait")}
        self.layer_times = np.zeros(self.l1 - self.l0)   # compute seconds per local layer

    # -- shapes ------------------------------------------------------------------
    def _sizes(self):
        N, d = self.N, self.dims
        ls = range(self.l0, self.l1)
        return {"W": sum(d[l + 1] * d[l] for l in ls), "b": sum(d[l + 1] for l in ls),
                "z": sum(N * d[l + 1] for l in ls), "p": sum(N * d[l] for l in ls if l > 0),
                "q": sum(N * d[l + 1] for l in ls if l < self.L - 1),
                "u": 0 if self.implicit_u else sum(N * d[l + 1] for l in ls if l < self.L - 1),
                "in": N * d[self.l0] if self.l0 > 0 else 0}

    def _bind(self, st):
        """Per-layer views into the state's flat arrays (kept valid across resume)."""
        N, d, layers = self.N, self.dims, []
        off = dict.fromkeys(("W", "b", "z", "p", "q"), 0)

        def take(name, arr, n, shape):
            v = arr[off[name]:off[name] + n].reshape(shape)
            off[name] += n
            return v
        for l in range(self.l0, self.l1):
            n_in, n_out = d[l], d[l + 1]
            W = take("W", st.W, n_out * n_in, (n_out, n_in))
            b = take("b", st.b, n_out, (n_out,))
            oz = off["z"]
            z = take("z", st.z, N * n_out, (N, n_out))
            R = st.R[oz:oz + N * n_out].reshape(N, n_out)
            p = self.X if l == 0 else take("p", st.p, N * n_in, (N, n_in))
            lay = _Layer(l, W, b, z, R, p)
            if l < self.L - 1:
                oq = off["q"]
                lay.q = take("q", st.q, N * n_out, (N, n_out))
                lay.u = None if self.implicit_u else st.u[oq:oq + N * n_out].reshape(N, n_out)
            layers.append(lay)
        self._layers, self._st_id = layers, (id(st.W), id(st.z))
        self.q_in = st.q_in.reshape(N, d[self.l0]) if self.l0 > 0 else None
        self.u_in = st.u_in.reshape(N, d[self.l0]) if self.l0 > 0 else None
        return layers

    def _scratch(self):
        N, d, dt = self.N, self.dims, self.dtype
        ls = range(self.l0, self.l1)
        narrow = [d[l + 1] for l in ls if l > 0 and d[l + 1] < d[l]]
        self._S = np.empty(N * max(narrow, default=0), dt)              # G W^T / p G^T of narrow layers
        # rows per block: quantised runs take smaller blocks (their dequantised p/q blocks are extra memory)
        self._rb = _ROWS if self.grid is None else min(_ROWS, _QROWS)
        self._B = np.empty(self._rb * max((d[l] for l in ls if l > 0), default=0), dt)   # a row block of G
        self._gram0 = None
        if self.l0 == 0:                                                 # X^T X: X never changes
            self._gram0 = np.matmul(self.X.T, self.X).astype(np.float64)
        self._ce = np.empty(N)
        last_w = d[self.l1]
        pq = self.cfg.quantize_p
        self._p_recv = np.empty((N, last_w), dt) if self.l1 < self.L and not pq else None
        self._pidx_recv = np.empty((N, last_w), self.idx_dtype) if self.l1 < self.L and pq else None
        self._Fp = self._Fq = None
        if self.grid is not None:                       # row blocks of dequantised p and q
            wmax = max(d[max(self.l0, 1):self.l1 + 1])         # the stored p/q widths (X is float)
            self._Fp = np.empty(self._rb * wmax, dt)
            self._Fq = np.empty(self._rb * wmax, dt)

    def _blocks(self, n):
        return [(r0, min(n, r0 + self._rb)) for r0 in range(0, n, self._rb)]

    def as_float(self, a):
        """Local. The values of a stored p/q array: ``a`` itself, or the grid values of its indices."""
        if a is None or a.dtype.kind == "f":
            return a
        return KQ.dequantize(a, *self.grid, dtype=self.dtype)

    def _rows(self, a, r0, r1, buf):
        """Local. Float rows [r0, r1) of a stored p/q array: a view, or its grid values in ``buf``."""
        if a.dtype.kind == "f":
            return a[r0:r1]
        out = buf[:(r1 - r0) * a.shape[1]].reshape(r1 - r0, a.shape[1])
        return KQ.dequantize(a[r0:r1], *self.grid, dtype=self.dtype, out=out)

    def _p_wt(self, p, W, out):
        """Local. ``out = p W^T`` (row blocks when p is stored as grid indices)."""
        if p.dtype.kind == "f":
            return np.matmul(p, W.T, out=out)
        for r0, r1 in self._blocks(len(p)):
            np.matmul(self._rows(p, r0, r1, self._Fp), W.T, out=out[r0:r1])
        return out

    def _at_p(self, A, p):
        """Local. ``A^T p`` (summed over row blocks when p is stored as grid indices)."""
        if p.dtype.kind == "f":
            return np.matmul(A.T, p)
        out = np.zeros((A.shape[1], p.shape[1]), self.dtype)
        tmp = np.empty_like(out)
        for r0, r1 in self._blocks(len(p)):
            pf = self._rows(p, r0, r1, self._Fp)
            out += np.matmul((pf if A is p else A[r0:r1]).T, pf, out=tmp)
        return out

    def _refresh(self, lay):
        """Local. R_l = z_l - p_l W_l^T - b_l from a fresh GEMM."""
        self._p_wt(lay.p, lay.W, lay.R)
        KA.resid_refresh(lay.R, lay.z, lay.b)

    # -- init ----------------------------------------------------------------------
    def init(self, params, comm):
        """Collective over the path ``comm``: a forward pass through the ranks.

        ``params = (Ws, bs)``: this block's weights (n_l x n_{l-1}) and biases.
        z_l = a_l, q_l = relu(z_l) (projected when quantising), p_{l+1} = q_l,
        u_l = 0 (= nu (q_l - relu z_l) when implicit), R_l = 0.
        """
        c = self.cfg
        set_threads(c.threads_per_rank)
        _blas_threads(c.threads_per_rank)
        s, dt = self._sizes(), self.dtype
        nl = self.l1 - self.l0
        qt = self.idx_dtype or dt                      # q, q_in as grid indices when quantising
        pt = self.idx_dtype if c.quantize_p else dt
        st = PdADMMState(W=np.empty(s["W"], dt), b=np.empty(s["b"], dt), z=np.empty(s["z"], dt),
                         R=np.zeros(s["z"], dt), p=np.empty(s["p"], pt), q=np.empty(s["q"], qt),
                         u=np.zeros(s["u"], dt), q_in=np.empty(s["in"], qt), u_in=np.zeros(s["in"], dt),
                         tau_p=np.zeros(nl), tau_W=np.zeros(nl), rejected=np.zeros((nl, 2), np.int64),
                         costs=np.full(3, np.nan), rho=float(c.rho))
        layers = self._bind(st)
        self._scratch()
        Ws, bs = params
        if self.l0 > 0:
            comm.start_exchange({}, {self.rank - 1: self.q_in}, tag=_TAG_INIT).wait()
            _copy_stored(self.q_in, layers[0].p, self.grid)
        for j, lay in enumerate(layers):
            lay.W[...] = Ws[j]
            lay.b[...] = bs[j]
            self._p_wt(lay.p, lay.W, lay.z)
            lay.z += lay.b
            if lay.q is not None:
                if self.grid is None:
                    np.maximum(lay.z, 0, out=lay.q)
                else:                                   # q = the grid point nearest to relu(z)
                    for r0, r1 in self._blocks(self.N):
                        f = self._Fq[:(r1 - r0) * lay.q.shape[1]].reshape(r1 - r0, -1)
                        np.maximum(lay.z[r0:r1], 0, out=f)
                        KQ.quantize(f, *self.grid, out_idx=lay.q[r0:r1])
                nxt = layers[j + 1].p if j + 1 < nl else None
                if nxt is not None:
                    _copy_stored(lay.q, nxt, self.grid)
        if self.l1 < self.L:
            comm.start_exchange({self.rank + 1: layers[-1].q}, {}, tag=_TAG_INIT).wait()
        return st

    # -- one iteration -----------------------------------------------------------------
    def step(self, k, state, oracle, comm):
        """Collective over the path ``comm`` (two neighbour messages per boundary)."""
        c, T = self.cfg, self.times
        if self._st_id != (id(state.W), id(state.z)):
            self._bind(state)
        layers, rho, nu, rank = self._layers, state.rho, c.nu, self.rank
        LT = self.layer_times
        t = time.perf_counter()
        for j, lay in enumerate(layers):
            if lay.l > 0:
                self._p_update(j, lay, state, rho)
                t = _tick(T, "p", t, LT, j)
        # p of the first layer goes to the previous rank; p of the next rank's first layer comes in
        send, recv = {}, {}
        if self.l0 > 0:
            send[rank - 1] = layers[0].p                    # grid indices with quantize_p
        if self.l1 < self.L:
            recv[rank + 1] = self._pidx_recv if c.quantize_p else self._p_recv
        ex = comm.start_exchange(send, recv, tag=_TAG_P)
        t = time.perf_counter()
        for j, lay in enumerate(layers):
            self._w_update(j, lay, state)
            t = _tick(T, "W", t, LT, j)
            KA.center_columns(lay.R, lay.b)
            t = _tick(T, "b", t, LT, j)
            if lay.q is not None and self.implicit_u:
                KA.z_step_dual(lay.z, lay.R, lay.q, nu)         # q's buffer now holds u_old
            elif lay.q is not None:                         # quantised: q stored as indices
                for r0, r1 in self._blocks(self.N):
                    KA.z_step(lay.z[r0:r1], lay.R[r0:r1], self._rows(lay.q, r0, r1, self._Fq))
            else:
                a = lay.z - lay.R
                _, ce, _ = KA.ce_prox(a, self.y, lay.z, nu, c.fista_step, c.fista_iters, c.fista_tol,
                                      out=lay.z, ce=self._ce)
                np.subtract(lay.z, a, out=lay.R)
                state.loss = float(np.sum(ce) / self.N)
            t = _tick(T, "z", t, LT, j)
        _wait(ex, c.wait_poll_us)
        t = _tick(T, "wait", t)
        for j, lay in enumerate(layers):
            if lay.q is None:
                continue
            p_next = layers[j + 1].p if j + 1 < len(layers) else (
                self._pidx_recv if c.quantize_p else self._p_recv)
            if self.grid is not None:                       # q (indices) and u in one sweep of row blocks
                for r0, r1 in self._blocks(self.N):
                    pn = self._rows(p_next, r0, r1, self._Fp)
                    qf = self._Fq[:(r1 - r0) * lay.q.shape[1]].reshape(r1 - r0, -1)
                    KQ.q_update_quantized(lay.z[r0:r1], pn, lay.u[r0:r1], nu, rho, *self.grid,
                                          out=qf, out_idx=lay.q[r0:r1])
                    KA.u_update(lay.u[r0:r1], pn, qf, rho)
                t = _tick(T, "q", t, LT, j)
                continue
            else:
                KA.q_update(lay.z, p_next, lay.q if self.implicit_u else lay.u, nu, rho, out=lay.q)
            t = _tick(T, "q", t, LT, j)
            if not self.implicit_u:
                KA.u_update(lay.u, p_next, lay.q, rho)
                t = _tick(T, "u", t, LT, j)
        # q of the last layer goes to the next rank (for its p update at k + 1)
        send, recv = {}, {}
        if self.l1 < self.L:
            send[rank + 1] = layers[-1].q                   # grid indices when quantising
        if self.l0 > 0:
            recv[rank - 1] = self.q_in
        _wait(comm.start_exchange(send, recv, tag=_TAG_Q), c.wait_poll_us)
        t = _tick(T, "wait", t)
        if self.l0 > 0:
            if self.grid is not None:
                for r0, r1 in self._blocks(self.N):
                    KA.u_update(self.u_in[r0:r1], self._rows(layers[0].p, r0, r1, self._Fp),
                                self._rows(self.q_in, r0, r1, self._Fq), rho)
            else:
                KA.u_update(self.u_in, layers[0].p, self.q_in, rho)
            t = _tick(T, "u", t, LT, 0)
        if c.rho_raise:
            self._raise_rho(state, comm)
        last = self.l1 == self.L
        return state, {"loss": state.loss if last else None, "rho": rho}

    def _p_update(self, j, lay, state, rho):
        """Local. One backtracking gradient step on p_l (see the module docstring).

        Wide layers (n_in <= n_out): G = R W is written over R's own storage (R is
        recomputed afterwards), and g^T H g takes ||G W^T||^2 = <G^T G, W^T W>.
        Narrow layers: two passes over row blocks (G is recomputed in the second),
        and S = G W^T (N x n_out, small) updates R.  Neither needs an N x n_in buffer.
        """
        c, nu, N = self.cfg, self.cfg.nu, self.N
        n_in, n_out = lay.p.shape[1], lay.R.shape[1]
        prev = self._layers[j - 1] if j > 0 else None
        q_prev = prev.q if prev is not None else self.q_in

        stored = self.grid is not None                  # q (and p) as indices: float rows by blocks
        pq = c.quantize_p

        def grad(g, r0, r1, pf):
            if prev is not None and self.implicit_u:
                KA.p_grad_dual(g, pf, q_prev[r0:r1], prev.z[r0:r1], nu, rho)
            else:
                u_prev = prev.u if prev is not None else self.u_in
                KA.p_grad(g, pf, self._rows(q_prev, r0, r1, self._Fq), u_prev[r0:r1], nu, rho)

        if n_in <= n_out:
            G = _matmul_over(lay.R, lay.W, self._B, self._rb)
            if stored:
                for r0, r1 in self._blocks(N):
                    grad(G[r0:r1], r0, r1, self._rows(lay.p, r0, r1, self._Fp))
            else:
                grad(G, 0, N, lay.p)
            gg = KA.sumsq(G)
            ghg = nu * _gram_dot(np.matmul(G.T, G), np.matmul(lay.W.T, lay.W)) + rho * gg
        else:
            S = self._S[:N * n_out].reshape(N, n_out)
            gg = 0.0
            for r0, r1 in self._blocks(N):
                g = self._B[:(r1 - r0) * n_in].reshape(r1 - r0, n_in)
                np.matmul(lay.R[r0:r1], lay.W, out=g)
                grad(g, r0, r1, self._rows(lay.p, r0, r1, self._Fp))
                gg += KA.sumsq(g)
                np.matmul(g, lay.W.T, out=S[r0:r1])
            ghg = nu * KA.sumsq(S) + rho * gg
        t, _, ok = KA.backtrack(gg, ghg, c.tau0, c.max_doublings)
        state.tau_p[j] = t
        if not ok:
            state.rejected[j, 0] += 1
        elif n_in <= n_out and not pq:
            KA.axpy(lay.p, G, -1.0 / t)
        elif n_in <= n_out:                                 # p_new = the grid point nearest to p - G/t
            for r0, r1 in self._blocks(N):
                pf = self._rows(lay.p, r0, r1, self._Fp)
                KA.axpy(pf, G[r0:r1], -1.0 / t)
                KQ.quantize(pf, *self.grid, out_idx=lay.p[r0:r1])
        else:
            for r0, r1 in self._blocks(N):
                g = self._B[:(r1 - r0) * n_in].reshape(r1 - r0, n_in)
                np.matmul(lay.R[r0:r1], lay.W, out=g)
                pf = self._rows(lay.p, r0, r1, self._Fp)
                grad(g, r0, r1, pf)
                KA.axpy(pf, g, -1.0 / t)
                if pq:
                    KQ.quantize(pf, *self.grid, out_idx=lay.p[r0:r1])
        if n_in <= n_out or (ok and pq):
            self._refresh(lay)                              # R = z - p W^T - b (fresh)
        elif ok:
            KA.axpy(lay.R, S, 1.0 / t)

    def _w_update(self, j, lay, state):
        """Local. One backtracking gradient step on W_l (see the module docstring).

        g^T H g = nu ||p G^T||^2 + mu ||G||^2.  Narrow layers (n_out < n_in, l > 0)
        form S = p G^T (small) and update R with it; the others take
        ||p G^T||^2 = <G (p^T p), G> (p^T p of X is computed once) and recompute R.
        """
        c, nu, N = self.cfg, self.cfg.nu, self.N
        n_in, n_out = lay.p.shape[1], lay.R.shape[1]
        G = self._at_p(lay.R, lay.p)
        G *= -nu
        if c.mu > 0:
            G += c.mu * lay.W
        gg = KA.sumsq(G)
        narrow = lay.l > 0 and n_out < n_in
        if narrow:
            S = self._S[:N * n_out].reshape(N, n_out)
            self._p_wt(lay.p, G, S)
            pg = KA.sumsq(S)
        else:
            gram = self._gram0 if lay.l == 0 else self._at_p(lay.p, lay.p)
            pg = _gram_dot(np.matmul(G, gram), G)
        t, _, ok = KA.backtrack(gg, nu * pg + c.mu * gg, c.tau0, c.max_doublings)
        state.tau_W[j] = t
        if not ok:
            state.rejected[j, 1] += 1
            return
        KA.axpy(lay.W, G, -1.0 / t)
        if narrow:
            KA.axpy(lay.R, S, 1.0 / t)
        else:
            self._refresh(lay)

    def _raise_rho(self, state, comm):
        cost = np.array([state.loss if self.l1 == self.L else 0.0])
        comm.bcast(cost, root=self.size - 1)
        h = state.costs
        h[:2] = h[1:]
        h[2] = cost[0]
        c = self.cfg
        if np.all(np.isfinite(h)) and h[0] - h[1] < c.rho_tol and h[1] - h[2] < c.rho_tol:
            state.rho = min(state.rho * c.rho_factor, c.rho_max)

    # -- model access ------------------------------------------------------------------
    def duals(self, state):
        """Local. {l: u_l} of this rank's layers l < L (the stored u or nu (q_l - relu z_l), a copy)."""
        if self._st_id != (id(state.W), id(state.z)):
            self._bind(state)
        nu = self.cfg.nu
        return {lay.l: (lay.u.copy() if lay.u is not None else nu * (lay.q - np.maximum(lay.z, 0)))
                for lay in self._layers if lay.q is not None}

    def weights(self, state):
        """Local. [(W_l, b_l)] of this rank's layers (views into the state)."""
        if self._st_id != (id(state.W), id(state.z)):
            self._bind(state)
        return [(lay.W, lay.b) for lay in self._layers]


_ROWS = 4096
"""Rows per block of the blocked GEMMs (a block of G is _ROWS x n_in)."""
_QROWS = 1024
"""Rows per block in quantised runs (dequantised p/q blocks of _QROWS x width, 2 MB at width 500)."""


def _row_blocks(n):
    return [(r0, min(n, r0 + _ROWS)) for r0 in range(0, n, _ROWS)]


def _matmul_over(R, W, buf, rows=None):
    """Local. G = R W (N x n_in, n_in <= n_out) written over R's own storage; returns that view.

    Row block [r0, r1) of G lands on flat elements [r0 n_in, r1 n_in), which lie
    before row r1 of R, so no row of R is overwritten before it has been read.
    """
    n, n_in = R.shape[0], W.shape[1]
    flat = R.reshape(-1)
    for r0, r1 in (_row_blocks(n) if rows is None else [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]):
        blk = buf[:(r1 - r0) * n_in].reshape(r1 - r0, n_in)
        np.matmul(R[r0:r1], W, out=blk)
        flat[r0 * n_in:r1 * n_in] = blk.reshape(-1)
    return flat[:n * n_in].reshape(n, n_in)


def _copy_stored(src, dst, grid):
    """Local. ``dst[...] = src`` between stored p/q arrays (grid indices -> floats by dequantising)."""
    if src.dtype == dst.dtype:
        dst[...] = src
    else:
        KQ.dequantize(src, *grid, dtype=dst.dtype, out=dst)


def _gram_dot(A, B):
    """Local. <A, B> (sum of the elementwise product) in float64."""
    return float(np.vdot(np.asarray(A, np.float64), np.asarray(B, np.float64)))


def _wait(ex, poll_us):
    """Local. Complete exchange ``ex``: test it every ``poll_us`` microseconds and sleep in between.

    MPICH's blocking wait spins on a core: with more ranks than free cores (L = 3 ranks
    on 2 cores, or a loaded node) a waiting rank takes CPU time from the ranks that
    compute.  A sleeping rank leaves it to them; each test drives MPI's progress
    engine, so the messages still move (measured: benchmarks/bench_pdadmm.py scale).
    """
    if poll_us <= 0 or not hasattr(ex, "test"):
        ex.wait()
        return
    dt = poll_us * 1e-6
    while not ex.test():
        time.sleep(dt)
    ex.wait()


def _tick(times, key, t, per_layer=None, j=0):
    now = time.perf_counter()
    times[key] += now - t
    if per_layer is not None:
        per_layer[j] += now - t
    return now


def _blas_threads(n):
    """Local. Limit the BLAS behind NumPy to ``n`` threads (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=int(n), user_api="blas")
