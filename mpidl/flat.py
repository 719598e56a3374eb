"""Torch parameters and gradients as views into one contiguous buffer.

``FlatModel(model)`` re-points every parameter's ``.data`` and ``.grad`` at
slices of two flat tensors, ``params`` and ``grads``, so one collective moves
the whole model and an algorithm works on plain vectors:

    x = fm.x        # the parameter buffer (zero copy)
    g = fm.g        # the gradient buffer

Where the buffers live decides what ``x`` and ``g`` are:

* on the CPU (the default), NumPy views of the two tensors: the algorithms do
  NumPy arithmetic, as they always have;
* on a device (``FlatModel(model, dtype, device="cuda:0")``, or a model whose
  parameters already live there and ``device=None``), the device tensors
  themselves: the model, the batches, the gradients *and* the algorithm's state
  (every array an algorithm makes is made like ``x``, :mod:`mpidl.xp`) stay on
  the device, and the algorithm's update runs there as torch operations.  The
  communicators stage a device buffer through a pinned host mirror, or hand it
  to MPI directly when the MPI is CUDA-aware (:mod:`mpidl.comm.core`);
* ``resident=True`` gives the device form on the CPU (``x``/``g`` CPU tensors),
  so the exact code a GPU runs is tested on machines without one.

Autograd accumulates into an existing ``.grad`` in place; :meth:`backward`
checks that every gradient still lives in the buffer and re-links (copying)
any that autograd replaced, so the views can never silently go stale.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["FlatModel"]


class FlatModel:
    """Local. A torch module whose parameters live in one flat buffer."""

    def __init__(self, model: torch.nn.Module, dtype=torch.float32, device=None, resident=None):
        if device is None:   # where the model already is (a user's module on a GPU stays there)
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else "cpu"
        device = torch.device(device)
        self.resident = device.type != "cpu" or bool(resident)
        self.device = device if device.type != "cpu" else None
        self.model = model.to(dtype)
        if self.device is not None:
            self.model.to(self.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params_list = [p for _, p in named]
        self.shapes = [p.shape for p in self.params_list]
        self.sizes = [p.numel() for p in self.params_list]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        n = int(self.offsets[-1])
        self.params = torch.empty(n, dtype=dtype, device=device)
        self.grads = torch.zeros(n, dtype=dtype, device=device)
        with torch.no_grad():
            for p, a, b in zip(self.params_list, self.offsets[:-1], self.offsets[1:]):
                self.params[a:b].copy_(p.detach().reshape(-1))
        self._link()
        if self.resident:
            self.x, self.g = self.params, self.grads
        else:
            self.x, self.g = self.params.numpy(), self.grads.numpy()

    @property
    def dim(self) -> int:
        return self.params.numel()

    def _link(self):
        for p, shape, a, b in zip(self.params_list, self.shapes, self.offsets[:-1], self.offsets[1:]):
            p.data = self.params[a:b].view(shape)
            p.grad = self.grads[a:b].view(shape)

    def zero_grad(self):
        self.grads.zero_()

    def backward(self, loss: torch.Tensor):
        """Local. Zero the gradient buffer, backpropagate ``loss``, keep grads in the buffer."""
        self.grads.zero_()
        loss.backward()
        self.collect_grads()

    def collect_grads(self):
        """Local. Make every ``.grad`` a view of the gradient buffer again.

        A gradient autograd replaced (after ``zero_grad(set_to_none=True)``,
        for instance) is copied into the buffer; a parameter without one gets
        zeros there.
        """
        grads = self.grads
        base = grads.data_ptr()
        itemsize = grads.element_size()
        for p, shape, a, b in zip(self.params_list, self.shapes, self.offsets[:-1], self.offsets[1:]):
            if p.grad is None:
                grads[a:b].zero_()
                p.grad = grads[a:b].view(shape)
            elif p.grad.data_ptr() != base + int(a) * itemsize:
                grads[a:b].copy_(p.grad.reshape(-1))
                p.grad = grads[a:b].view(shape)

    def load(self, x):
        """Local. Copy a flat vector (NumPy or torch, any device) into the parameters; a no-op when
        ``x`` is the buffer itself."""
        if x is self.x:
            return
        if isinstance(x, np.ndarray) and not self.resident and np.shares_memory(x, self.x) \
                and x.__array_interface__["data"][0] == self.x.__array_interface__["data"][0]:
            return
        from mpidl import xp
        xp.assign(self.x, x)

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
