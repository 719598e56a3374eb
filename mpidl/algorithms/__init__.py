"""Training algorithms, one module per family; see :mod:`mpidl.algorithms.base`.

Importing this package registers the built-in algorithms with
:func:`mpidl.config.register_algorithm`.
"""
from mpidl.algorithms import cdsgd, fdg_grid, lsgd, next, pdadmm_layout  # noqa: F401
