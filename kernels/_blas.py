"""Small Numba building blocks shared by the kernels (private)."""
import numba

from ._flags import JIT


@numba.njit(inline="always", **JIT)
def row_dot(A, i, c0, v):
    """``sum_j A[i, c0 + j] * v[j]`` over ``j < len(v)``, accumulated in float64.

    Four partial sums in a fixed order: the dependency chain is 4x shorter
    than a plain loop (which LLVM may not reassociate without fastmath) and
    the result does not depend on FASTMATH or the thread count.
    """
    n = v.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    j = 0
    while j + 4 <= n:
        s0 += A[i, c0 + j] * v[j]
        s1 += A[i, c0 + j + 1] * v[j + 1]
        s2 += A[i, c0 + j + 2] * v[j + 2]
        s3 += A[i, c0 + j + 3] * v[j + 3]
        j += 4
    while j < n:
        s0 += A[i, c0 + j] * v[j]
        j += 1
    return (s0 + s1) + (s2 + s3)
