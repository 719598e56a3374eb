"""The layer layout of pdADMM for the one driver loop (:mod:`mpidl.layouts`).

Ranks are layers, or contiguous blocks of layers when there are fewer ranks
than layers (:func:`mpidl.algorithms.pdadmm.layer_blocks`), on a path graph.
Three communicators over the world, all paths:

* ``gc``: the algorithm's per-iteration messages (its byte counter is what the
  results file records as ``bytes_sent``);
* ``ec``: the initial forward pass and the evaluation forward passes;
* ``mc``: the driver's control traffic.

Data: the whole training set, full batch (``run.batch_size = 0``); images are
average-pooled by ``algorithm.downsample`` (2: Fashion-MNIST 28x28 -> 14x14 =
196 features) and flattened.  The model must be ``model.name = "mlp"``; its
seeded torch initialisation (``algorithm.init = "torch"``) or N(0, init_std)
weights and biases (``"normal"``, as the public pdADMM code) start the run.

Evaluation (Collective): a forward pass of the current weights through the
layer ranks (rank r receives the activations of rank r - 1) on the test set
and on the first ``data.eval_samples`` training samples.
"""
from __future__ import annotations

import os

import numpy as np

from mpidl import config as C
from mpidl import topology as T
from mpidl.kernels import quantize as KQ
from mpidl.algorithms.pdadmm import PdADMM, PdADMMConfig, PdADMMQConfig, layer_blocks
from mpidl.errors import MpidlError
from mpidl.layouts import Session, provenance

__all__ = ["PdADMMSession", "setup_layers", "downsample"]

_TAG_EVAL = 21


class PdADMMError(MpidlError):
    """A pdADMM run cannot start (raised on every rank)."""


def downsample(x, f):
    """Local. Average-pool images (N, C, H, W) by ``f`` and flatten to (N, C H W / f^2)."""
    x = np.asarray(x)
    if f == 1:
        return x.reshape(len(x), -1)
    if x.ndim != 4 or x.shape[2] % f or x.shape[3] % f:
        raise PdADMMError(f"downsample={f} needs images (N, C, H, W) with H and W divisible by {f}, "
                          f"got shape {x.shape}")
    n, c, h, w = x.shape
    return x.reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5), dtype=np.float64).reshape(n, -1)


def _mlp_dims(cfg, n_in, n_cls):
    """Widths [n_0, ..., n_L] of the configured MLP, or raise PdADMMError."""
    m = cfg.model
    if m.name != "mlp":
        raise PdADMMError(f"pdADMM trains an MLP (model.name = \"mlp\"), got model {m.name!r}")
    hidden = list(m.hidden)
    if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
        raise PdADMMError(f"pdADMM needs at least one hidden layer of positive integer width, "
                          f"got model.hidden = {list(m.hidden)}")
    if m.loss != "ce":
        raise PdADMMError(f"pdADMM minimises cross-entropy: model.loss must be \"ce\", got {m.loss!r}")
    return [int(n_in)] + [int(h) for h in hidden] + [int(n_cls)]


def _mlp_params(cfg, dims):
    """(Ws, bs) of the MLP with widths ``dims`` (seeded torch init or N(0, init_std))."""
    a, hidden = cfg.algorithm, dims[1:-1]
    n_in, n_cls = dims[0], dims[-1]
    if a.init == "normal":
        rng = np.random.default_rng(cfg.run.seed)
        Ws = [rng.normal(0, a.init_std, (dims[l + 1], dims[l])) for l in range(len(dims) - 1)]
        bs = [rng.normal(0, a.init_std, dims[l + 1]) for l in range(len(dims) - 1)]
        return Ws, bs
    import torch

    from mpidl.models import build_model
    model = build_model("mlp", (n_in,), n_cls, tuple(hidden), seed=cfg.run.seed)
    lins = [mod for mod in model if isinstance(mod, torch.nn.Linear)]
    return [l.weight.detach().double().numpy() for l in lins], [l.bias.detach().double().numpy() for l in lins]


def _memory_check(dims, n, l0, l1, itemsize, quantize, quantize_p=False, idx_size=2):
    """Raise when this rank's state + scratch would not fit in the available memory.

    Quantised runs hold q (and q_in; p and the received p with ``quantize_p``) as grid
    indices of ``idx_size`` bytes, and u in floats.
    """
    L = len(dims) - 1
    qb = idx_size if quantize else itemsize                                        # bytes of a q value
    pb = idx_size if quantize_p else itemsize                                      # bytes of a p value
    need = 0
    for l in range(l0, l1):
        need += (dims[l + 1] * dims[l] + dims[l + 1] + 2 * n * dims[l + 1]) * itemsize   # W, b, z, R
        need += n * dims[l] * pb if l > 0 else 0                                   # p
        if l < L - 1:
            need += n * dims[l + 1] * (qb + (itemsize if quantize else 0))          # q (and u when quantised)
    if l0 > 0:
        need += n * dims[l0] * (qb + itemsize)                                     # q_in, u_in
    if l1 < L:
        need += n * dims[l1] * pb                                                  # p received
    narrow = [dims[l + 1] for l in range(max(l0, 1), l1) if dims[l + 1] < dims[l]]
    need += n * max(narrow, default=0) * itemsize                                  # S of narrow layers
    # every rank builds the whole seeded model once (float32 torch + a float64 copy)
    need += 12 * sum(dims[l + 1] * (dims[l] + 1) for l in range(L))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return need
    if need > avail:
        raise PdADMMError(f"layers {l0 + 1}..{l1} with widths {dims[l0:l1 + 1]} and {n} samples need "
                          f"{need / 2**30:.2f} GiB on this rank but {avail / 2**30:.2f} GiB are available: "
                          "use more ranks, narrower layers or fewer samples")
    return need


class PdADMMSession(Session):
    """Collective construction over ``world``; see the module docstring."""

    def __init__(self, cfg: C.Config, world):
        self.gc = self.ec = self.mc = None
        try:
            self._build(cfg, world)
        except BaseException:
            self.close()
            raise

    size_keys = ("rank_layout",)
    resizable = False                 # [run] resize = "no" then gives this layout's own error

    def resize(self, old, like, comm):
        """Not possible: the ranks hold different layers of one network, not copies to average."""
        from mpidl.resize import ResizeError
        raise ResizeError(f"{self.algo.name}: the checkpoint's {old.n} ranks hold different layers of one "
                          f"network (not copies of a model to average), and moving layer blocks onto "
                          f"{self.mc.size} ranks is not implemented; resume with mpiexec -n {old.n}")

    def _build(self, cfg, world):
        from mpidl.comm import CollectiveError, GraphComm
        from mpidl.data import load_dataset

        rank, size = world.Get_rank(), world.Get_size()
        topo = T.path(size)
        self.mc = GraphComm(world, topo)
        self.gc = GraphComm(world, topo)
        self.ec = GraphComm(world, topo)
        a, d = cfg.algorithm, cfg.data
        self.cfg = cfg
        dtype = np.float64 if cfg.model.dtype == "float64" else np.float32
        err, ds = None, None
        try:
            if cfg.run.batch_size != 0:
                raise PdADMMError(f"pdADMM is full batch: set run.batch_size = 0 (got {cfg.run.batch_size})")
            ds = load_dataset(d.dataset, d.data_dir or None, seed=d.seed, path=d.path or None)
            if ds.num_classes < 2:
                raise PdADMMError(f"pdADMM needs a classification dataset, {d.dataset!r} has none")
            X = downsample(ds.x_train, a.downsample).astype(dtype, copy=False)
            dims = _mlp_dims(cfg, X.shape[1], ds.num_classes)
            L = len(dims) - 1
            if size > L:
                raise PdADMMError(f"pdADMM needs at most one rank per layer: {size} ranks for the "
                                  f"{L} layers of MLP {dims}; start fewer ranks or add hidden layers")
            l0, l1 = layer_blocks(L, size)[rank]
            _memory_check(dims, len(X), l0, l1, np.dtype(dtype).itemsize, a.quantize, a.quantize_p,
                          KQ.index_dtype(a.grid_points).itemsize)
        except (MpidlError, ValueError) as e:
            err = e
        try:
            self.mc.agree(None if err is None else str(err))
        except CollectiveError as e:
            raise PdADMMError(str(e)) from None
        Ws, bs = _mlp_params(cfg, dims)
        self.dims, self.L, self.l0, self.l1 = dims, L, l0, l1
        N = len(X)
        first, last = l0 == 0, l1 == L
        n_tr = min(N, d.eval_samples or N)
        self.n_eval = (len(ds.y_test), n_tr)
        if first:
            self.x_eval = np.ascontiguousarray(np.concatenate([downsample(ds.x_test, a.downsample), X[:n_tr]]),
                                               dtype=dtype)
        if last:
            self.y_eval = np.concatenate([ds.y_test, ds.y_train[:n_tr]]).astype(np.int64)
        y_train = ds.y_train.astype(np.int64) if last else None
        ds = None                              # free the full-resolution images before the state exists
        X = X if first else None
        self.algo = PdADMM(a, dims=dims, n_samples=N, rank=rank, size=size, dtype=dtype,
                           X=np.ascontiguousarray(X, dtype=dtype) if first else None,
                           y=y_train)
        self.state = self.algo.init(([w.astype(dtype) for w in Ws[l0:l1]], [b.astype(dtype) for b in bs[l0:l1]]),
                                    self.ec)
        self.comm, self.oracle, self.steps_per_epoch = self.gc, None, 1
        self.expect = {"algorithm": a.name, "rank_layout": f"layers:{size}", "dims": ",".join(map(str, dims)),
                       **provenance(cfg)}
        self.dtype = dtype

    def describe(self):
        c = self.algo.cfg
        q = f", quantized q{'+p' if c.quantize_p else ''} on {c.grid_points} points" if c.quantize else ""
        return (f"{self.algo.name}: {self.mc.size} layer rank(s), MLP {self.dims} (L={self.L}), "
                f"{self.algo.N} samples full batch, rho={c.rho:g}, nu={c.nu:g}{q}")

    def bytes_sent(self):
        return float(self.gc.bytes_sent)

    def evaluate(self, state):
        """Collective. Forward pass through the layer ranks on the test set and a training subset."""
        rank, n = self.mc.rank, sum(self.n_eval)
        if self.l0 == 0:
            x = self.x_eval
        else:
            x = np.empty((n, self.dims[self.l0]), self.dtype)
            self.ec.start_exchange({}, {rank - 1: x}, tag=_TAG_EVAL).wait()
        h = np.empty((n, self.dims[self.l1]), self.dtype)
        _forward(x, self.algo.weights(state), self.l1 == self.L, out=h)
        x = None
        sums = np.zeros(4)
        if self.l1 < self.L:
            self.ec.start_exchange({rank + 1: h}, {}, tag=_TAG_EVAL).wait()
        else:
            z = h.astype(np.float64)
            m = z.max(axis=1)
            ce = m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - z[np.arange(n), self.y_eval]
            ok = np.argmax(z, axis=1) == self.y_eval
            nt = self.n_eval[0]
            sums[:] = [ce[:nt].sum(), ok[:nt].sum(), ce[nt:].sum(), ok[nt:].sum()]
        sums = self.mc.allreduce(sums)
        nt, nr = self.n_eval
        rej = self.mc.allreduce(np.asarray(state.rejected.sum(axis=0), dtype=np.float64))
        out = {"test_loss": sums[0] / nt, "test_acc": sums[1] / nt,
               "train_loss_forward": sums[2] / max(nr, 1), "train_acc_forward": sums[3] / max(nr, 1),
               "rho": float(state.rho), "rejected_p_steps": float(rej[0]), "rejected_W_steps": float(rej[1])}
        return out, None

    def summary(self, ev):
        return f"forward pass through {self.mc.size} layer rank(s); train acc {ev['train_acc_forward']:.4f}"

    def close(self):
        for c in (self.ec, self.gc, self.mc):
            if c is not None:
                c.close()
        self.ec = self.gc = self.mc = None


def _forward(x, weights, last, out, rows=4096):
    """Local. ``out = layers(x)`` (relu after each layer except the network's last), in row
    blocks so that the temporaries stay small (a few MB instead of two N x width arrays)."""
    for r0 in range(0, len(x), rows):
        h = x[r0:r0 + rows]
        for j, (W, b) in enumerate(weights):
            h = np.matmul(h, W.T)
            h += b
            if not (last and j == len(weights) - 1):
                np.maximum(h, 0, out=h)
        out[r0:r0 + rows] = h
    return out


def setup_layers(cfg: C.Config, world) -> PdADMMSession:
    """Collective. The layer layout of pdADMM (see the module docstring)."""
    return PdADMMSession(cfg, world)


def _factory(cfg, **ctx):
    return PdADMM(cfg, **ctx)


C.register_algorithm("pdadmm", PdADMMConfig, _factory, layout=setup_layers)
C.register_algorithm("pdadmm-q", PdADMMQConfig, _factory, layout=setup_layers)
