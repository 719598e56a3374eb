"""Local loss/gradient providers (never communicate).

:class:`TorchOracle` wraps a :class:`~mpidl.flat.FlatModel` and this agent's
training data.  The minibatch of step k is a pure function of
(seed, rank, k): epoch e = k // steps_per_epoch uses the permutation drawn
from ``numpy.random.default_rng([seed, rank, e])`` and step k takes the
slice ``(k mod steps_per_epoch) * batch`` of it.  A resumed run therefore
sees exactly the batches an uninterrupted run would, with no data-order state
to checkpoint.  ``[data] shuffle = "block"`` draws a chunk-friendly permutation
instead (:class:`mpidl.convex.Order`).

:class:`BatchStream` assembles step k's batch (inputs and labels): with
``[data] prefetch = P > 0`` a background reader (:class:`mpidl.prefetch.Prefetcher`)
builds the next P batches while the step computes; the batches are the same
with and without it.  A bad batch (``[data] check = "batch"``: NaN/inf in the
rows read) or a reader that fails does not raise inside the step, where the
other ranks would wait in a collective: the oracle returns a NaN loss and a
zero gradient and keeps the message in ``data_error``; the driver agrees it
over all ranks at the next log / eval / checkpoint boundary, before any save.

:class:`ConvexOracle` and :func:`batch_indices` live in :mod:`mpidl.convex`
(NumPy and Numba only, so a convex run never imports torch) and are
re-exported here.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from mpidl.convex import ConvexOracle, Order, batch_indices  # noqa: F401  (re-exported; torch-free)
from mpidl.errors import MpidlError
from mpidl.flat import FlatModel

__all__ = ["TorchOracle", "ConvexOracle", "batch_indices", "Batches", "BatchStream", "BatchError", "as_batch"]

STAGE_ON_CPU = False
"""Tests set it: a CPU run then takes the path of a GPU run's batches (copies to the device issued
from the reader's finished batches, the next one while the current step computes), minus pinning."""


class BatchError(MpidlError, ValueError):
    """A training batch that cannot be used (NaN/inf in its rows) or could not be read."""


def as_batch(x, dtype) -> torch.Tensor:
    """Local. Rows (an ndarray, a tensor or lazy :class:`mpidl.sources.Rows`) as a tensor of ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.asarray(x)).to(dtype)


class Batches:
    """Local. A shard's inputs as torch batches.

    In-memory inputs are converted to ``dtype`` once; lazy HDF5 rows
    (:class:`mpidl.sources.Rows`) are read batch by batch, so a rank holds one
    batch of them at a time.  With ``augment`` each image batch of step ``k``
    gets a random crop (pad 4) and horizontal flip drawn from
    ``numpy.random.default_rng([seed, stream, k, 1])``: a pure function of the
    step, so a resumed run augments exactly as an uninterrupted one.
    """

    def __init__(self, x, dtype, *, augment=False, seed=0, stream=0):
        self.lazy = hasattr(x, "read") and not isinstance(x, np.ndarray)
        self.x = x if self.lazy else torch.as_tensor(np.asarray(x)).to(dtype)
        self.dtype, self.augment, self.seed, self.stream = dtype, bool(augment), int(seed), int(stream)
        self.shape = tuple(x.shape)

    def __len__(self):
        return self.shape[0]

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Local. Rows a..b-1 (not augmented)."""
        return as_batch(self.x[a:b], self.dtype)

    def raw(self, idx: np.ndarray, read=None) -> torch.Tensor:
        """Local. The rows ``idx`` as a tensor of ``dtype`` (not augmented); ``read(idx)`` replaces
        the lazy source's own read (the block cache of :class:`BatchStream`)."""
        if not self.lazy:
            return self.x[torch.from_numpy(idx)]
        return torch.as_tensor((read or self.x.read)(idx)).to(self.dtype)

    def augmented(self, xb: torch.Tensor, k: int) -> torch.Tensor:
        """Local. ``xb`` with step ``k``'s crop and flip when ``augment`` is on, else ``xb``."""
        if not self.augment:
            return xb
        from mpidl.sources import augment_batch
        rng = np.random.default_rng([self.seed, self.stream, int(k), 1])
        return torch.from_numpy(augment_batch(xb.numpy(), rng))

    def take(self, idx: np.ndarray, k: int) -> torch.Tensor:
        """Local. The rows ``idx`` of step ``k``'s batch (augmented when asked)."""
        return self.augmented(self.raw(idx), k)


class BatchStream:
    """Local. Step ``k``'s training batch ``(inputs, labels)``, on the model's device.

    ``order`` (:class:`mpidl.convex.Order`) gives the rows of each step.
    ``prefetch = P > 0``: a reader thread builds the next ``P`` batches ahead.
    ``check``: every batch's inputs are checked for NaN/inf as they are read;
    a bad row raises :class:`BatchError` naming ``where`` (the file), the row
    (``file_rows[pos]``, or the file row of lazy inputs), the step and the
    rank.  Any exception of the reader becomes a :class:`BatchError` naming
    the step.  With block shuffling, lazy inputs are read a whole block at a
    time and the last ``2 * order.buffer`` blocks are kept, so each block is
    read once per epoch.

    ``device`` (a torch device, None for the CPU): with a GPU, each batch is
    put in pinned host memory by the reader and copied with ``non_blocking``;
    when the next step's batch is already built, its copy is issued right away,
    so it overlaps the current step (``stage`` forces that path on the CPU).
    """

    def __init__(self, x, y, order: Order, dtype, *, regression=False, augment=False, seed=0, stream=0,
                 prefetch=0, check=False, where="", file_rows=None, rank=0, device=None, stage=None):
        self.x = Batches(x, dtype, augment=augment, seed=seed, stream=stream)
        self.y = torch.as_tensor(np.asarray(y)).to(dtype if regression else torch.long)
        self.order, self.check, self.where, self.rank = order, bool(check), str(where), int(rank)
        self.file_rows = None if file_rows is None else np.asarray(file_rows)
        dev = None if device is None or torch.device(device).type == "cpu" else torch.device(device)
        self.stage = (dev is not None if stage is None else bool(stage)) or STAGE_ON_CPU
        self.device = dev if dev is not None else (torch.device("cpu") if self.stage else None)
        self.pin = self.device is not None and self.device.type == "cuda"
        # a GPU: copies run on their own stream, so the next batch's copy overlaps the step's kernels
        self._copy_stream = torch.cuda.Stream(device=self.device) if self.pin else None
        self._blocks = OrderedDict() if order.shuffle == "block" and self.x.lazy else None
        self._lock = threading.Lock()
        self._pf = None
        if int(prefetch) > 0:
            from mpidl.prefetch import Prefetcher
            self._pf = Prefetcher(self.assemble, int(prefetch), name=f"mpidl-reader-{self.rank}")
        self._staged = None       # (k, xb, yb): a batch whose copy to the device was issued early
        self.early_copies = 0     # how many batches had their copy issued during the step before

    def _row(self, pos: int) -> int:
        if self.x.lazy:
            return int(self.x.x.file_rows(np.array([pos]))[0])
        return int(self.file_rows[pos]) if self.file_rows is not None else int(pos)

    def _read_blocks(self, ix: np.ndarray) -> np.ndarray:
        """Rows ``ix`` of the lazy inputs through the block cache (whole blocks read, LRU kept)."""
        B, n, src = self.order.block, len(self.x), self.x.x
        bl = ix // B
        out = None
        with self._lock:
            for b in np.unique(bl).tolist():
                arr = self._blocks.get(b)
                if arr is None:
                    arr = src.read(np.arange(b * B, min(n, (b + 1) * B)))
                    self._blocks[b] = arr
                    while len(self._blocks) > 2 * self.order.buffer:
                        self._blocks.popitem(last=False)
                else:
                    self._blocks.move_to_end(b)
                m = bl == b
                if out is None:
                    out = np.empty((len(ix),) + arr.shape[1:], np.float32)
                out[m] = arr[ix[m] - b * B]
        return out if out is not None else np.empty((0,) + tuple(self.x.shape[1:]), np.float32)

    def assemble(self, k: int):
        """Local. Step ``k``'s ``(inputs, labels)`` on the host (pinned for a GPU); raises BatchError."""
        ix = self.order.indices(k)
        try:
            xb = self.x.raw(ix, self._read_blocks if self._blocks is not None else None)
        except MpidlError:
            raise
        except Exception as e:  # noqa: BLE001  (any reader failure: one message naming the step)
            raise BatchError(f"{self.where}: reading the training batch of step {k} on rank {self.rank} failed: "
                             f"{type(e).__name__}: {e}") from None
        if self.check:
            bad = _first_bad(xb)
            if bad >= 0:
                raise BatchError(f"{self.where}: x_train row {self._row(int(ix[bad]))} holds NaN or inf (read for "
                                 f"step {k} on rank {self.rank}; [data] check = \"batch\")")
        xb, yb = self.x.augmented(xb, k), self.y[torch.from_numpy(ix)]
        if self.pin:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        return xb, yb

    def _to_device(self, xb, yb):
        """Start the copy of a host batch to the device: ``(inputs, labels, event or None)``."""
        if self.device is None:
            return xb, yb, None
        if self._copy_stream is None:                       # the CPU run of this path (tests)
            return xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True), None
        with torch.cuda.stream(self._copy_stream):
            dx, dy = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return dx, dy, done

    def _use(self, dx, dy, done):
        """The batch for the step: the step's stream waits for its copy (and keeps its memory)."""
        if done is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(done)
            dx.record_stream(cur)
            dy.record_stream(cur)
        return dx, dy

    def get(self, k: int):
        """Local. Step ``k``'s ``(inputs, labels)`` on the device; raises :class:`BatchError`."""
        k = int(k)
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == k:
            moved = staged[1]
        else:
            moved = self._to_device(*(self._pf.get(k) if self._pf is not None else self.assemble(k)))
        if self.stage and self._pf is not None and self._pf.ready(k + 1) is not None:
            self._staged = (k + 1, self._to_device(*self._pf.get(k + 1)))   # its copy overlaps step k
            self.early_copies += 1
        return self._use(*moved)

    def close(self) -> None:
        """Local. Stop the reader thread."""
        if self._pf is not None:
            self._pf.close()


def _first_bad(xb: torch.Tensor) -> int:
    from mpidl.sources import first_bad_row
    return first_bad_row(xb)


class TorchOracle:
    """Local. Loss of a torch model on this agent's data.

    ``loss="ce"``: cross-entropy; ``loss="squared"``: 1/(2m) sum_s ||f(x_s) - t_s||^2
    with t_s the one-hot label (classification) or the target (num_classes == 0,
    regression, which always uses the squared loss).
    """

    def __init__(self, fm: FlatModel, x, y, *, batch_size: int, steps_per_epoch: int,
                 seed: int = 0, rank: int = 0, num_classes: int = 10, loss: str = "ce", augment: bool = False,
                 shuffle: str = "global", block: int = 1, buffer: int = 1, prefetch: int = 0, check: bool = False,
                 where: str = "", file_rows=None, stage=None):
        self.fm = fm
        dtype = fm.params.dtype
        self.regression = num_classes == 0
        self.squared = self.regression or loss == "squared"
        self.num_classes = num_classes
        self.batch = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed, self.rank = int(seed), int(rank)
        self.order = Order(len(y), self.batch, self.steps_per_epoch, self.seed, self.rank, shuffle, block, buffer)
        self.stream = BatchStream(x, y, self.order, dtype, regression=self.regression, augment=augment, seed=seed,
                                  stream=rank, prefetch=prefetch, check=check, where=where, file_rows=file_rows,
                                  rank=rank, device=fm.device, stage=stage)
        self.x, self.y = self.stream.x, self.stream.y
        self.n = len(self.x)
        self.dim = fm.dim
        self.last_correct = 0.0
        self.data_error = None      # (step, message) of the first batch that could not be used

    def _target(self, y):
        if self.regression:
            return y.reshape(y.shape[0], -1)
        return torch.nn.functional.one_hot(y, self.num_classes).to(self.fm.params.dtype)

    def _loss(self, out, y):
        if self.squared:
            return 0.5 * torch.mean(torch.sum((out.reshape(y.shape[0], -1) - self._target(y)) ** 2, 1))
        return torch.nn.functional.cross_entropy(out, y)

    def full_loss_grad(self, x: np.ndarray, batch: int = 2000):
        """Local. Loss and gradient over all local samples at ``x`` (gradient copied)."""
        self.fm.load(x)
        self.fm.model.train()
        total = 0.0
        from mpidl import xp
        g = xp.zeros_like(self.fm.g)
        for a in range(0, self.n, batch):
            xb, yb = self.fm.to_device(self.x.rows(a, a + batch)), self.fm.to_device(self.y[a:a + batch])
            loss = self._loss(self.fm.model(xb), yb) * (yb.shape[0] / self.n)
            self.fm.backward(loss)
            total += float(loss.detach())
            g += self.fm.g
        return total, g

    def residual_jacobian(self, x: np.ndarray, k: int):
        """Local. (J, r, m) of step k's minibatch for the squared loss: J = d f / d w (m*C x P),
        r = f(w) - t flattened, m = batch size (Gauss-Newton surrogate of NEXT)."""
        if not self.squared:
            raise ValueError("the Gauss-Newton surrogate needs the squared loss (loss = \"squared\")")
        from torch.func import functional_call, jacrev
        self.fm.load(x)
        xb, yb = self.stream.assemble(k)
        tb = self._target(yb)
        model = self.fm.model

        def f(flat):
            return functional_call(model, self.fm.param_views(flat), (xb,)).reshape(-1)

        with torch.no_grad():
            r = (f(self.fm.params) - tb.reshape(-1)).numpy()
        J = jacrev(f)(self.fm.params.detach()).numpy()
        return J, r, int(yb.shape[0])

    def indices(self, k: int) -> np.ndarray:
        """Local. Same as :func:`batch_indices`, with the epoch's permutation drawn once per epoch."""
        return self.order.indices(k)

    def loss_grad(self, x: np.ndarray, k: int):
        """Local. (loss, grad) of step k's minibatch at ``x``; grad is the model's gradient buffer.

        A batch that cannot be used gives a NaN loss and a zero gradient and is noted in
        ``data_error`` (the driver agrees it over the ranks; see the module docstring).
        """
        self.fm.load(x)
        try:
            xb, yb = self.stream.get(k)     # on the model's device
        except MpidlError as e:
            if self.data_error is None:
                self.data_error = (int(k), str(e))
            self.fm.grads.zero_()
            self.last_correct = float("nan")
            return float("nan"), self.fm.g
        self.fm.model.train()
        out = self.fm.model(xb)
        loss = self._loss(out, yb)
        self.fm.backward(loss)
        if not self.regression:
            self.last_correct = float((out.detach().argmax(1) == yb).float().mean())
        return float(loss.detach()), self.fm.g

    def close(self) -> None:
        """Local. Stop the batch reader thread, if any."""
        self.stream.close()

    @torch.no_grad()
    def evaluate(self, x: np.ndarray, X, Y, batch: int = 1000):
        """Local. (mean loss, accuracy) of parameters ``x`` on (X, Y); accuracy is NaN for regression."""
        self.fm.load(x)
        self.fm.model.eval()
        Y = torch.as_tensor(np.asarray(Y))
        Y = Y.to(self.fm.params.dtype if self.regression else torch.long)
        total, correct = 0.0, 0
        for a in range(0, Y.shape[0], batch):
            out = self.fm.model(self.fm.to_device(as_batch(X[a:a + batch], self.fm.params.dtype)))
            yb = self.fm.to_device(Y[a:a + batch])
            total += float(self._loss(out, yb)) * yb.shape[0]
            if not self.regression:
                correct += int((out.argmax(1) == yb).sum())
        n = max(Y.shape[0], 1)
        return total / n, (float("nan") if self.regression else correct / n)
