"""Data parallelism x fully decoupled backpropagation with stale gradients (FDG on an M x K grid).

Pham & Ahn, arXiv 2509.05679, built on FDG (Zhuang et al., arXiv 1906.09108)
and DDG (Huo et al., arXiv 1804.10574).  Ranks form an M x K grid (see
:class:`mpidl.comm.GridComm`): replica m in 0..M-1, stage k in 0..K-1; stage k
holds module f_k (a contiguous slice of the network, :func:`mpidl.models.slice_model`)
with parameters w_k.  Iteration t (the driver's step), d_k = 2 (K - 1 - k),
batches b = 0, 1, ... of replica m fed in order (``n_b = total - 2 (K - 1)``
batches, so the pipeline drains by the last iteration):

* stage k forwards batch ``t - k`` and backpropagates batch ``t - k - d_k``;
* non-last stage (k < K - 1), in this order:
    1. backward: with delta received from stage k + 1 in iteration t - 1,
         (g_k, e_k) = (d/dw, d/dh) <beta delta, f_k(h_k^b; w_k^(b))>
       where h_k^b is the stored input of batch b = t - k - d_k and
       w_k^(b) the stashed weights its forward used (weight stashing:
       the gradient is exactly the one at the stale weights); send e_k to k - 1;
    2. step: g = mean_m (g_k + wd w_k) (allreduce over the stage's M copies),
         v <- mu v + g;  w_k <- w_k - alpha_t (g + mu v if nesterov else v)
       (torch.optim.SGD convention; skipped while the pipeline fills);
    3. forward: h_{k+1} = f_k(h_k; w_k) of batch t - k with the new weights,
       stash (h_k, w_k) in slot (t - k) mod d_k, send h_{k+1} to k + 1;
* last stage: forward of batch t - (K - 1) at the current weights, loss
  L = CE(f_{K-1}(h), y) (batch mean), backward at once (staleness 0),
  send dL/dh to K - 2, then the step.

beta in (0, 1] multiplies the gradient a non-last stage receives, so stage k
sees beta^(K-1-k) overall (FDG's gradient shrinking).  Stage k's gradient is
d_k = 2 (K - 1 - k) iterations stale: the batch it backpropagates at t was
forwarded at t - d_k, with the weights w_k after step t - d_k.  K = 1 is
data-parallel SGD (mpidl's ``centralized``), M = 1 is FDG.

Why weight stashing: on torch 2.x a backward through a graph whose weights
the optimizer changed in place fails ("modified by an inplace operation");
torch <= 1.0 (where the public FDG/DDG code ran) silently mixed new weights
into the input-gradient.  Here each forward runs ``functional_call`` on a
stashed COPY of the weights (one row of ``w_stash``), so the live weights
never enter a graph, and the kept graph is exact at the stale weights with no
recomputation.  The graphs themselves are a cache: the state holds the stashed
inputs and weights (arrays), and after a resume the graphs are rebuilt by
re-running those forwards (bitwise the same, BatchNorm statistics untouched).

Messages: activations and input-gradients are point-to-point Isend/Irecv
between neighbouring stages; a step posts its sends as soon as their data
exist (the input-gradient right after the backward, overlapping the step and
forward) and ends with Waitall, so the state after step t already holds the
messages that step t + 1 consumes (``act_in``, ``grad_in``): a checkpoint
captures everything in flight.  Reference: tests/reference/fdg.py.

Where the state lives: every array of :class:`FDGState` is made like ``x0``
(:mod:`mpidl.xp`), NumPy on the CPU, torch tensors on the stage's device when
its :class:`mpidl.flat.FlatModel` is device-resident.  In the device form the
stashes, messages, gradients and the update stay on the device (the messages
go to MPI staged through a host mirror, or directly with a CUDA-aware MPI,
:class:`mpidl.comm.GridComm`); the NumPy form computes exactly as before.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from mpidl import xp
from mpidl.algorithms.base import check_lr, lr_at
from mpidl.config import LRConfig

__all__ = ["FDGConfig", "FDGState", "FDG", "StageData", "staleness"]


def staleness(k: int, K: int) -> int:
    """Local. Iterations between the forward and the backward of a batch at stage k: 2 (K - 1 - k)."""
    return 2 * (K - 1 - k)


@dataclass(frozen=True)
class FDGConfig(LRConfig):
    name: str = "fdg"
    stages: int = 2                     # K, pipeline stages per replica
    replicas: int = 0                   # M, data-parallel replicas (0 = world size / stages)
    cuts: tuple = ()                    # K - 1 unit indices; () = balanced by measured cost
    beta: float = 1.0                   # gradient shrinking, in (0, 1]
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0

    def validate(self):
        check_lr(self)
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1], got {self.beta}")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0 (0 = world size / stages), got {self.replicas}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        c = self.cuts
        if (any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in c)
                or any(a >= b for a, b in zip(c, c[1:]))):
            raise ValueError(f"cuts must be increasing unit indices >= 1 ([] = balanced), got {list(c)}")
        if c and len(c) != self.stages - 1:
            raise ValueError(f"cuts must list stages - 1 = {self.stages - 1} unit indices, got {list(c)}")


@dataclass
class FDGState:
    x: np.ndarray          # w_k: this stage's parameters (the live model's flat buffer)
    v: np.ndarray          # momentum buffer
    w_stash: np.ndarray    # (d_k, P): weights the forward of each in-flight batch used (slot b mod d_k)
    in_stash: np.ndarray   # (d_k, B, *in): that batch's input h_k
    act_in: np.ndarray     # (B, *in): activation from stage k - 1 for the next forward ((0,) at k = 0)
    grad_in: np.ndarray    # (B, *out): input-gradient from stage k + 1 for the next backward ((0,) last)


class StageData:
    """Local. Replica m's minibatches, in the order of :class:`mpidl.oracles.TorchOracle`.

    Batch b uses the permutation ``default_rng([seed, m, b // spe])`` of the
    replica's shard (or its block permutation, ``[data] shuffle = "block"``) and
    takes slice ``b mod spe``; only the first and last stage read data (inputs /
    labels), in the step (no reader thread), and the inputs were checked for
    NaN/inf at start-up.
    """

    def __init__(self, x, y, *, batch, steps_per_epoch, seed, replica, dtype, num_classes, augment=False,
                 shuffle="global", block=1, buffer=1):
        from mpidl.convex import Order
        from mpidl.oracles import Batches
        self.x = Batches(x, dtype, augment=augment, seed=seed, stream=replica)
        self.regression = num_classes == 0
        self.y = torch.as_tensor(np.asarray(y)).to(dtype if self.regression else torch.long)
        self.batch, self.spe, self.seed, self.m = int(batch), int(steps_per_epoch), int(seed), int(replica)
        self.n = self.y.shape[0]
        self.order = Order(self.n, self.batch, self.spe, self.seed, self.m, shuffle, block, buffer)

    def indices(self, b: int) -> torch.Tensor:
        return torch.from_numpy(self.order.indices(b))

    def inputs(self, b):
        return self.x.take(self.indices(b).numpy(), b)

    def labels(self, b):
        return self.y[self.indices(b)]


class FDG:
    """Local math + point-to-point / stage collectives of one grid rank (replica m, stage k).

    Built by :func:`mpidl.algorithms.fdg_grid.setup_grid`; ``fm`` is the stage's
    :class:`mpidl.flat.FlatModel`, ``shapes`` the per-sample input shape of
    every stage plus the output shape, ``total_steps`` the run's iterations.
    """

    state_cls = FDGState
    torch_device = True                 # stage module, graphs and state on a GPU (mpidl.device)

    def __init__(self, cfg: FDGConfig, *, fm, k, K, batch, shapes, steps_per_epoch, total_steps,
                 loss="ce", num_classes=10):
        self.cfg, self.name = cfg, cfg.name
        self.fm, self.k, self.K = fm, int(k), int(K)
        self.last = self.k == self.K - 1
        self.d = staleness(self.k, self.K)
        self.batch = int(batch)
        self.in_shape, self.out_shape = tuple(shapes[self.k]), tuple(shapes[self.k + 1])
        self.steps_per_epoch = int(steps_per_epoch)
        self.total = int(total_steps)
        self.n_batches = max(0, self.total - 2 * (self.K - 1))
        self.loss_kind = "squared" if (num_classes == 0 or loss == "squared") else "ce"
        self.num_classes = int(num_classes)
        self.dtype = fm.params.dtype
        self.names, self.shapes_p = fm.names, fm.shapes
        self.offsets = fm.offsets
        self._graphs = {}          # slot -> (output, weight leaf, input leaf): a cache of the state
        self._keep = []            # send buffers alive until Waitall
        self.trace = None          # a list to record (event, t, b, ...) tuples (tests)

    # -- state -------------------------------------------------------------
    def init(self, x0, comm):
        """Local. State with w = x0 (in place: x0 is the stage model's buffer) and empty pipeline slots.

        Every array is made like ``x0``: NumPy, or tensors on x0's device (a resident stage).
        """
        B, P = self.batch, int(x0.shape[0])
        return FDGState(
            x=x0, v=xp.zeros_like(x0),
            w_stash=xp.zeros((self.d, P), like=x0),
            in_stash=xp.zeros((self.d, B) + self.in_shape, like=x0),
            act_in=xp.zeros((B,) + self.in_shape, like=x0) if self.k > 0 else xp.zeros((0,), like=x0),
            grad_in=xp.zeros((B,) + self.out_shape, like=x0) if not self.last else xp.zeros((0,), like=x0))

    def lr(self, t):
        return lr_at(self.cfg, t, self.steps_per_epoch)

    def _fed(self, b):
        return 0 <= b < self.n_batches

    # -- local math ----------------------------------------------------------
    def _leaf(self, a):
        """A tensor sharing ``a``'s memory (NumPy array or tensor) that autograd may take as a leaf.

        A tensor's ``.data`` has its own version counter: the stash rows a kept graph saved
        are views of one tensor, and writing another row (or a message into ``act_in``) must
        not count as modifying them (as NumPy writes do not).
        """
        return torch.from_numpy(a) if isinstance(a, np.ndarray) else a.data

    def _input(self, data, b):
        """Batch b's input for stage 0: a host array (NumPy form) or a tensor on the stage's device."""
        h = data.inputs(b)
        return self.fm.to_device(h) if self.fm.resident else h.numpy()

    def _forward(self, w_np, h_np, *, keep_buffers):
        """(output, weight leaf, input leaf) of f_k(h; w) with autograd on the given arrays.

        The arrays are NumPy (the CPU form) or tensors on the stage's device (the resident
        form: the graph then lives on the device); the leaves share their memory.
        """
        dev = self.fm.to_device
        w = dev(self._leaf(w_np)).requires_grad_(True)
        h = dev(self._leaf(h_np))
        if self.k > 0:
            h = h.requires_grad_(True)
        params = {n: w[a:b].view(s) for n, s, a, b in zip(self.names, self.shapes_p,
                                                          self.offsets[:-1], self.offsets[1:])}
        model = self.fm.model
        model.train()
        if not keep_buffers:  # rebuilding a graph: leave BatchNorm's running statistics alone
            params.update({n: b.clone() for n, b in model.named_buffers()})
        y = functional_call(model, params, (h,))
        return y, w, h

    def _loss(self, out, y):
        if self.loss_kind == "squared":
            t = (y.reshape(y.shape[0], -1) if self.num_classes == 0 else
                 torch.nn.functional.one_hot(y, self.num_classes).to(out.dtype))
            return 0.5 * torch.mean(torch.sum((out.reshape(out.shape[0], -1) - t) ** 2, 1))
        return torch.nn.functional.cross_entropy(out, y)

    def _grads(self, y, w, h, grad_out):
        wrt = [w] + ([h] if self.k > 0 else [])
        gs = torch.autograd.grad(y, wrt, grad_out)
        if self.fm.resident:    # the gradients stay on the stage's device
            return gs[0], (gs[1].contiguous() if self.k > 0 else None)
        return gs[0].cpu().numpy(), (gs[1].contiguous().cpu() if self.k > 0 else None)

    # -- one iteration ---------------------------------------------------------
    def step(self, t, state, data, grid):
        """Collective over the stage's M copies (one allreduce when the stage steps); point to point
        with stages k -+ 1.  ``data`` is this replica's :class:`StageData`, ``grid`` a GridComm."""
        k, K, cfg = self.k, self.K, self.cfg
        b_fwd, b_bwd = t - k, t - k - self.d
        loss, acc, gw = None, None, None
        if self.last:
            if self._fed(b_fwd):
                h_np = self._input(data, b_fwd) if k == 0 else state.act_in
                y, w, h = self._forward(state.x, h_np, keep_buffers=True)
                yb = self.fm.to_device(data.labels(b_fwd))
                L = self._loss(y, yb)
                gw, gx = self._grads(L, w, h, None)
                loss = float(L.detach())
                if self.num_classes:
                    acc = float((y.detach().argmax(1) == yb).to(torch.float64).mean())
                if k > 0:
                    self._send(grid, gx, -1, grid.TAG_GRAD)
                self._event("bwd", t, b_fwd, h_np, None, gw)
            if k > 0 and self._fed(t + 1 - k):
                grid.irecv(state.act_in, -1, grid.TAG_ACT)
        else:
            if self._fed(b_bwd):
                slot = b_bwd % self.d
                y, w, h = self._graphs.pop(slot, None) or self._forward(
                    state.w_stash[slot], state.in_stash[slot], keep_buffers=False)
                delta = self._leaf(state.grad_in)
                if cfg.beta != 1.0:
                    delta = delta * cfg.beta
                gw, gx = self._grads(y, w, h, delta)
                if k > 0:
                    self._send(grid, gx, -1, grid.TAG_GRAD)
                self._event("bwd", t, b_bwd, state.in_stash[slot], delta, gw)
            if self._fed(t + 1 - k - self.d):
                grid.irecv(state.grad_in, +1, grid.TAG_GRAD)
        if gw is not None:
            self._update(t, state, gw, grid)
        if not self.last:
            if self._fed(b_fwd):
                slot = b_fwd % self.d
                state.w_stash[slot] = state.x
                state.in_stash[slot] = self._input(data, b_fwd) if k == 0 else state.act_in
                y, w, h = self._forward(state.w_stash[slot], state.in_stash[slot], keep_buffers=True)
                self._graphs[slot] = (y, w, h)
                act = y.detach().contiguous()
                self._send(grid, act if self.fm.resident else act.cpu(), +1, grid.TAG_ACT)
                self._event("fwd", t, b_fwd)
            if k > 0 and self._fed(t + 1 - k):
                grid.irecv(state.act_in, -1, grid.TAG_ACT)
        grid.waitall()
        self._keep = []
        return state, {"loss": loss, "acc": acc}

    def _update(self, t, state, gw, grid):
        x, v, cfg = state.x, state.v, self.cfg
        g = gw  # a fresh array (or tensor) from autograd: updated in place
        if cfg.weight_decay:
            g += cfg.weight_decay * x
        if grid.M > 1:
            grid.allreduce_stage(g, op="mean", out=g)
        lr, mu = self.lr(t), cfg.momentum
        if mu:
            v *= mu
            v += g
            x -= lr * (g + mu * v if cfg.nesterov else v)
        else:
            x -= lr * g

    def _send(self, grid, tensor, direction, tag):
        self._keep.append(tensor)
        grid.isend(tensor, direction, tag)

    def _event(self, kind, t, b, *payload):
        if self.trace is not None:
            self.trace.append((kind, t, b) + tuple(None if p is None else
                                                  (p.detach().cpu().numpy() if torch.is_tensor(p) else p).copy()
                                                  for p in payload))

    # -- introspection ------------------------------------------------------------
    def stash_bytes(self, state) -> dict:
        """Local. Bytes held per stage for in-flight batches: stashed weights, stashed inputs, messages."""
        return {"w_stash": xp.nbytes(state.w_stash), "in_stash": xp.nbytes(state.in_stash),
                "act_in": xp.nbytes(state.act_in), "grad_in": xp.nbytes(state.grad_in)}


def state_fields():
    """Local. Names of the checkpointed state fields (docs/tests)."""
    return [f.name for f in dataclasses.fields(FDGState)]
