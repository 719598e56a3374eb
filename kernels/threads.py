"""Thread count and block partition helpers for the prange kernels.

The prange kernels in :mod:`mpidl.kernels` never choose their own thread
count: the caller (the agent, which knows how many cores its rank owns, e.g.
``threads_per_agent``) calls :func:`set_threads` once.  :func:`block_bounds` is
the one place that splits ``n`` entries into ``C`` contiguous blocks, so the
block-parallel kernels and their NumPy twins agree on the partition.
"""
import numba
import numpy as np


def set_threads(n):
    """Local. Set Numba's thread count to ``n`` clamped to ``[1, NUMBA_NUM_THREADS]``.

    ``NUMBA_NUM_THREADS`` (fixed when Numba's thread pool starts) is the most a
    process may use.  Returns the number actually set.
    """
    n = int(n)
    n = max(1, min(n, int(numba.config.NUMBA_NUM_THREADS)))
    numba.set_num_threads(n)
    return n


def block_bounds(n, n_blocks):
    """Local. Offsets ``b`` (int64, length ``C + 1``) of ``C`` contiguous blocks of ``range(n)``.

    Block ``c`` is ``[b[c], b[c+1])``; the first ``n % C`` blocks hold one entry
    more than the others (the split of ``numpy.array_split``).  ``C`` is
    clamped to ``[1, max(n, 1)]`` so no block is empty unless ``n == 0``.
    """
    n = int(n)
    c = int(n_blocks)
    if c < 1:
        raise ValueError(f"block_bounds: n_blocks must be >= 1, got {n_blocks}")
    c = min(c, max(n, 1))
    size, extra = divmod(n, c)
    sizes = np.full(c, size, dtype=np.int64)
    sizes[:extra] += 1
    bounds = np.zeros(c + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    return bounds
