"""mpidl.kernels: array-in, array-out Numba kernels (NumPy + Numba only).

Every public kernel validates its input and calls a private ``@njit`` twin;
each has a same-named NumPy reference in ``tests/reference``.  This package
never imports mpi4py or torch.
"""
from .losses import least_squares, least_squares_blocks, logistic, logistic_blocks
from .mixing import combine
from .prox import prox, prox_l2, soft_threshold
from .surrogate import (gn_solve, gn_solve_blocks, linearized_solve, linearized_step,
                        linearized_step_blocks, relax)
from .threads import block_bounds, set_threads

__all__ = [
    "combine",
    "soft_threshold", "prox_l2", "prox",
    "linearized_solve", "linearized_step", "linearized_step_blocks", "relax",
    "gn_solve", "gn_solve_blocks",
    "least_squares", "least_squares_blocks", "logistic", "logistic_blocks",
    "set_threads", "block_bounds",
]
