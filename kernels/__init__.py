"""mpidl.kernels: array-in, array-out Numba kernels (NumPy + Numba only).

Every public kernel validates its input and calls a private ``@njit`` twin;
each has a same-named NumPy reference in ``tests/reference``.  This package
never imports mpi4py or torch.
"""
from .mixing import combine

__all__ = ["combine"]
