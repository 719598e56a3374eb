"""GridComm: the M x K split, point-to-point along a pipeline, stage allreduce, counters, errors."""
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl.comm import CollectiveError, GridComm, GridError

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 120
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
GRIDS = [(m, N // m) for m in range(1, N + 1) if N % m == 0]


@pytest.mark.parametrize("M,K", GRIDS)
def test_split_and_messages(M, K):
    with GridComm(W, M, K) as g:
        m, k = R // K, R % K
        members = W.allgather((g.m, g.k, g.stage.size, g.path.Get_size(), g.path.Get_rank()))
        assert_all(all(e == (r // K, r % K, M, K, r % K) for r, e in enumerate(members)), f"{members}")
        # stage allreduce: mean over the M copies of stage k of (10 m + k)
        x = np.array([10.0 * m + k, 1.0])
        g.allreduce_stage(x, op="mean", out=x)
        assert_all(np.allclose(x, [10 * (M - 1) / 2 + k, 1.0]), f"stage mean {x}")
        # one hop forward and one backward, nonblocking, overlapping
        fwd, bwd = np.full(5, -1.0), np.full(3, -1.0)
        if k > 0:
            g.irecv(fwd, -1, g.TAG_ACT)
        if k < K - 1:
            g.irecv(bwd, +1, g.TAG_GRAD)
            g.isend(np.full(5, 100.0 * m + k), +1, g.TAG_ACT)
        if k > 0:
            g.isend(np.full(3, -100.0 * m - k), -1, g.TAG_GRAD)
        g.waitall()
        ok = (k == 0 or np.all(fwd == 100.0 * m + k - 1)) and (k == K - 1 or np.all(bwd == -100.0 * m - k - 1))
        assert_all(ok, f"messages {fwd} {bwd}")
        assert_all(g.link_bytes[+1] == (40 if k < K - 1 else 0) and g.link_bytes[-1] == (24 if k > 0 else 0),
                   f"link bytes {g.link_bytes}")
        err = None
        try:
            g.agree("bad on the last rank" if R == N - 1 else None)
        except CollectiveError as e:
            err = str(e)
        assert_all(err is not None and "bad on the last rank" in err, f"agree: {err}")


def test_grid_that_does_not_fit():
    assert_raises_all(GridError, GridComm, W, N + 1, 1, match=f"needs {N + 1} ranks")
    assert_raises_all(GridError, GridComm, W, 0, N, match="grid")


def test_no_successor_on_the_last_stage():
    with GridComm(W, 1, N) as g:
        if g.k == N - 1:
            with pytest.raises(ValueError, match="no successor"):
                g.isend(np.zeros(1), +1, g.TAG_ACT)
        W.Barrier()
