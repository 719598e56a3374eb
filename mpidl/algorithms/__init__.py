"""Training algorithms, one module per family; see :mod:`mpidl.algorithms.base`."""
