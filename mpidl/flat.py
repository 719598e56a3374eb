"""Torch parameters and gradients as views into one contiguous buffer.

``FlatModel(model)`` re-points every parameter's ``.data`` and ``.grad`` at
slices of two flat tensors, ``params`` and ``grads``, so one collective moves
the whole model and an algorithm works on plain vectors:

    x = fm.x        # NumPy view of the parameter buffer (zero copy)
    g = fm.g        # NumPy view of the gradient buffer

Autograd accumulates into an existing ``.grad`` in place; :meth:`backward`
checks that every gradient still lives in the buffer and re-links (copying)
any that autograd replaced, so the views can never silently go stale.

On a CUDA device (``FlatModel(model, dtype, device="cuda:0")``) the module and
two device buffers ``dparams`` / ``dgrads`` hold the parameters and gradients
the forward and backward use, while ``params`` / ``grads`` (and so ``x`` /
``g``) stay host buffers in pinned memory: the algorithms keep working on
NumPy views.  :meth:`load` copies the host parameters to the device (one
contiguous host-to-device copy per step) and :meth:`backward` copies the
gradient back (one device-to-host copy).  On the CPU ``dparams is params``
and ``dgrads is grads``: no copy, exactly the CPU path.  ``stage=True`` takes
the staging path on the CPU too (separate "device" buffers in host memory and
the same copies), so the staging logic is tested on machines without a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["FlatModel"]


class FlatModel:
    """Local. A torch module whose parameters live in one flat buffer."""

    def __init__(self, model: torch.nn.Module, dtype=torch.float32, device=None, stage=False):
        on_cpu = device is None or torch.device(device).type == "cpu"
        self.device = None if on_cpu and not stage else torch.device("cpu" if device is None else device)
        self.model = model.to(dtype)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params_list = [p for _, p in named]
        self.shapes = [p.shape for p in self.params_list]
        self.sizes = [p.numel() for p in self.params_list]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        n = int(self.offsets[-1])
        self.params = torch.empty(n, dtype=dtype)
        self.grads = torch.zeros(n, dtype=dtype)
        with torch.no_grad():
            for p, a, b in zip(self.params_list, self.offsets[:-1], self.offsets[1:]):
                self.params[a:b].copy_(p.detach().reshape(-1))
        if self.device is None:
            self.dparams, self.dgrads = self.params, self.grads
        else:  # host copies in pinned memory (fast, asynchronous-capable transfers); module on the device
            if self.device.type == "cuda":
                self.params, self.grads = self.params.pin_memory(), self.grads.pin_memory()
            self.model.to(self.device)
            self.dparams = self.params.to(self.device, copy=True)
            self.dgrads = torch.zeros(n, dtype=dtype, device=self.device)
        self._link()
        self.x = self.params.numpy()
        self.g = self.grads.numpy()

    @property
    def dim(self) -> int:
        return self.params.numel()

    def _link(self):
        for p, shape, a, b in zip(self.params_list, self.shapes, self.offsets[:-1], self.offsets[1:]):
            p.data = self.dparams[a:b].view(shape)
            p.grad = self.dgrads[a:b].view(shape)

    def zero_grad(self):
        self.dgrads.zero_()

    def backward(self, loss: torch.Tensor):
        """Local. Zero the gradient buffer, backpropagate ``loss``, keep grads in the buffer.

        On a device, the gradient is then copied to the host buffer (``g``) in one transfer.
        """
        grads = self.dgrads
        grads.zero_()
        loss.backward()
        self.collect_grads()

    def collect_grads(self):
        """Local. Make every ``.grad`` a view of the gradient buffer again.

        A gradient autograd replaced (after ``zero_grad(set_to_none=True)``,
        for instance) is copied into the buffer; a parameter without one gets
        zeros there.  On a device, the gradient is then copied to the host
        buffer (``g``) in one transfer.
        """
        grads = self.dgrads
        base = grads.data_ptr()
        itemsize = grads.element_size()
        for p, shape, a, b in zip(self.params_list, self.shapes, self.offsets[:-1], self.offsets[1:]):
            if p.grad is None:
                grads[a:b].zero_()
                p.grad = grads[a:b].view(shape)
            elif p.grad.data_ptr() != base + int(a) * itemsize:
                grads[a:b].copy_(p.grad.reshape(-1))
                p.grad = grads[a:b].view(shape)
        if self.device is not None:
            self.grads.copy_(grads)  # blocking: g is valid on return

    def load(self, x: np.ndarray):
        """Local. Copy a flat vector into the parameters (no-op when it is the buffer itself).

        On a device the host buffer is then copied to the device (always: the
        algorithm updates the host buffer in place between calls).
        """
        if not (x is self.x or (isinstance(x, np.ndarray) and np.shares_memory(x, self.x)
                                and x.__array_interface__["data"][0] == self.x.__array_interface__["data"][0])):
            self.x[...] = x
        if self.device is not None:
            self.dparams.copy_(self.params, non_blocking=True)  # pinned source: ordered before the forward

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Local. ``t`` on the model's device (the tensor itself on the CPU)."""
        return t if self.device is None else t.to(self.device, non_blocking=True)

    def param_views(self, flat: torch.Tensor) -> dict:
        """Local. ``{name: view}`` of a flat vector laid out like the parameters (for torch.func)."""
        return {n: flat[a:b].view(shape) for n, shape, a, b in
                zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])}

    def buffers(self) -> dict:
        """Local. Non-parameter state (e.g. BatchNorm running statistics) as NumPy arrays."""
        return {name: b.detach().cpu().numpy().copy() for name, b in self.model.named_buffers()}

    def load_buffers(self, d: dict):
        own = dict(self.model.named_buffers())
        for name, value in d.items():
            own[name].copy_(torch.from_numpy(np.asarray(value)))  # copy_ moves host values to the device
