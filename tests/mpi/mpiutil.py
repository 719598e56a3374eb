"""Helpers for MPI tests: collective assertions and agent-deterministic data."""
import numpy as np
from mpi4py import MPI


def assert_all(cond, msg="", comm=None):
    """Collective assert: every rank fails when any rank's ``cond`` is false."""
    comm = comm or MPI.COMM_WORLD
    ok = comm.allreduce(bool(cond), op=MPI.LAND)
    if not ok:
        bad = [r for r, c in enumerate(comm.allgather(bool(cond))) if not c]
        raise AssertionError(f"failed on rank(s) {bad}: {msg}")


def assert_raises_all(exc_type, fn, *args, match=None, **kwargs):
    """Collective: ``fn`` must raise ``exc_type`` on every rank; returns the exception."""
    err = None
    try:
        fn(*args, **kwargs)
    except exc_type as e:  # noqa: PERF203
        err = e
    ok = err is not None and (match is None or match in str(err))
    assert_all(ok, f"expected {exc_type.__name__}({match!r}), got {err!r}")
    return err


def agent_data(n, shape, dtype, seed=0):
    """The stacked (n, *shape) matrix every rank can rebuild identically."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + tuple(shape)).astype(dtype)


def pmean(arrs, S):
    """The documented order: partial float64 sums of arrs[p::S], added in order; / n; cast."""
    total = np.zeros(arrs[0].shape)
    for p in range(S):
        part = np.zeros(arrs[0].shape)
        for a in arrs[p::S]:
            part += a
        total += part
    return (total / len(arrs)).astype(arrs[0].dtype)
