"""Numba compilation flags, read once from the environment at import.

``MPIDL_FASTMATH`` (default 0), ``MPIDL_CACHE`` (default 1) and
``MPIDL_PARALLEL`` (default 1) control every kernel in :mod:`mpidl.kernels`;
no kernel reads the environment itself.  ``NUMBA_DISABLE_JIT=1`` (Numba's own
switch) turns every kernel into plain Python for coverage runs.
"""
import os


def _flag(name, default):
    value = os.environ.get(name, default)
    return str(value).strip().lower() not in ("0", "false", "no", "off", "")


FASTMATH = _flag("MPIDL_FASTMATH", "0")
CACHE = _flag("MPIDL_CACHE", "1")
PARALLEL = _flag("MPIDL_PARALLEL", "1")

JIT = dict(nogil=True, cache=CACHE, fastmath=FASTMATH)
"""Keyword arguments for ``numba.njit`` used by every serial kernel."""

PJIT = dict(JIT, parallel=PARALLEL)
"""Keyword arguments for ``numba.njit`` used by prange kernels."""
