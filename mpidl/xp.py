"""The few array operations that differ between NumPy arrays and torch tensors.

The algorithms keep their flat state (parameters, momentum, leader copies,
pipeline stashes) in the library the model's parameter buffer lives in: NumPy
views on the CPU (the arithmetic is then exactly mpidl's CPU arithmetic), torch
tensors on the rank's device when the model is device-resident
(:class:`mpidl.flat.FlatModel` on a GPU).  An update is written once with the
Python operators both libraries share (``x -= lr * g``, ``v *= mu``,
``x[...] = y``) and, where they differ, with the functions below, which
dispatch on the type of their first argument.  Nothing here imports torch
unless a tensor is passed, so a NumPy-only run (NEXT, pdADMM) never loads it.

Rules of the namespace (what makes one code path correct on both):

* new arrays are made *like* an existing one (same library, dtype, device):
  :func:`empty_like`, :func:`zeros_like`, :func:`copy`, :func:`zeros`;
* out-of-place results that must land in an existing buffer use
  :func:`subtract` (``out=``) or :func:`assign`;
* host-side code (metrics, checkpoints, evaluation) reads device state through
  :func:`to_numpy`, which copies only when the data is not already on the host.
"""
from __future__ import annotations

import numpy as np

__all__ = ["is_tensor", "empty_like", "zeros_like", "copy", "zeros", "subtract", "assign", "to_numpy",
           "on_host", "nbytes"]


def is_tensor(a) -> bool:
    """Local. True for a torch tensor (checked without importing torch)."""
    return type(a).__module__.startswith("torch")


def empty_like(a):
    """Local. An uninitialised array of ``a``'s shape, dtype, library and device."""
    if is_tensor(a):
        import torch
        return torch.empty_like(a)
    return np.empty_like(a)


def zeros_like(a):
    """Local. Zeros of ``a``'s shape, dtype, library and device."""
    if is_tensor(a):
        import torch
        return torch.zeros_like(a)
    return np.zeros_like(a)


def copy(a):
    """Local. A copy of ``a`` in the same library, on the same device."""
    return a.clone() if is_tensor(a) else a.copy()


def zeros(shape, like):
    """Local. Zeros of ``shape`` with ``like``'s dtype, library and device (``shape`` an int or tuple)."""
    if is_tensor(like):
        import torch
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return np.zeros(shape, like.dtype)


def subtract(a, b, out):
    """Local. ``out = a - b`` elementwise, written into ``out`` (which may be ``a`` or ``b``)."""
    if is_tensor(out):
        import torch
        return torch.sub(a, b, out=out)
    return np.subtract(a, b, out=out)


def assign(dst, src):
    """Local. ``dst[...] = src`` across libraries and devices (a NumPy array into a GPU tensor, ...)."""
    if is_tensor(dst):
        import torch
        if not is_tensor(src):
            src = torch.from_numpy(np.ascontiguousarray(src))
        dst.copy_(src.reshape(dst.shape))
    else:
        dst[...] = to_numpy(src).reshape(dst.shape) if is_tensor(src) else src
    return dst


def on_host(a) -> bool:
    """Local. True when ``a``'s data is in host memory (a NumPy array or a CPU tensor)."""
    return not is_tensor(a) or a.device.type == "cpu"


def to_numpy(a) -> np.ndarray:
    """Local. ``a`` as a NumPy array: the array itself, a zero-copy view of a CPU tensor, or a
    host copy of a device tensor."""
    if is_tensor(a):
        t = a.detach()
        return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()
    return np.asarray(a)


def nbytes(a) -> int:
    """Local. Bytes of ``a``'s data."""
    return int(a.numel() * a.element_size()) if is_tensor(a) else int(a.nbytes)
