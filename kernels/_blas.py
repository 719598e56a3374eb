"""Small Numba building blocks shared by the kernels (private)."""
import numba

from ._flags import JIT


@numba.njit(**JIT)
def row_dot(A, i, v):
    """``sum_j A[i, j] * v[j]`` over ``j < len(v)``, accumulated in float64.

    Four partial sums in a fixed order: the dependency chain is 4x shorter
    than a plain loop (which LLVM may not reassociate without fastmath) and
    the result does not depend on FASTMATH or the thread count.

    Performance notes that apply to every kernel here: (1) no ``inline="always"``
    for functions taking arrays: Numba's IR inlining adds an NRT incref/decref
    pair per call that LLVM does not always prune (measured: 20+ ns per call,
    a 50x slowdown of an elementwise loop); (2) index with loop counters that
    start at 0 (pass slices, not offsets), otherwise Numba's negative-index
    wraparound cannot be proven dead and the loop does not vectorise.
    """
    n = v.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    j = 0
    while j + 4 <= n:
        s0 += A[i, j] * v[j]
        s1 += A[i, j + 1] * v[j + 1]
        s2 += A[i, j + 2] * v[j + 2]
        s3 += A[i, j + 3] * v[j + 3]
        j += 4
    while j < n:
        s0 += A[i, j] * v[j]
        j += 1
    return (s0 + s1) + (s2 + s3)
