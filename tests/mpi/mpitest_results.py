"""Under mpiexec: consensus error, rank-0 results file, agreed data errors."""
import os

import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import agent_data, assert_all, assert_raises_all
from mpidl import data
from mpidl.errors import MpidlError
from mpidl.metrics import Recorder, consensus_error, load_results

MPI_SIZES = (2, 3)  # one rank: tests/test_metrics.py, tests/test_data.py
MPI_TIMEOUT = 180
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()


@pytest.fixture
def tmp(shared_tmp):
    return shared_tmp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_consensus_error_matches_stacked(gc, dtype):
    X = agent_data(N, (13,), dtype, seed=4)
    ref = np.sqrt(np.mean(np.sum((X.astype(np.float64) - X.astype(np.float64).mean(0)) ** 2, axis=1)))
    got = consensus_error(gc, X[R].copy())
    assert_all(abs(got - ref) <= 1e-5 * max(1.0, ref), f"{got} != {ref}")
    assert_all(gc.bytes_sent == 0, "a measurement must not count as algorithm traffic")
    same = consensus_error(gc, np.ones(4, dtype))
    assert_all(same == 0.0, f"identical agents: {same}")


def test_only_rank0_writes_results(gc, tmp):
    path = os.path.join(tmp, "res.h5")
    rec = Recorder(path, gc, {"algorithm": "cdsgd"})
    for k in range(1, 6):
        err = consensus_error(gc, np.full(3, float(R)))
        rec.log("train", k, loss=float(k), consensus_error=err, bytes_sent=gc.bytes_sent)
    rec.close()
    gc.barrier()
    d = load_results(path)
    assert_all(list(d["series"]["train"]["step"]) == [1, 2, 3, 4, 5] and d["attrs"]["world_size"] == N,
               "results file content")
    assert_all(sorted(os.listdir(tmp)) == ["res.h5"], f"files {os.listdir(tmp)}")


def test_recorder_error_is_raised_everywhere(gc, tmp):
    bad = os.path.join(tmp, "file")
    if R == 0:
        open(bad, "w").close()
    gc.barrier()
    assert_raises_all(MpidlError, Recorder, os.path.join(bad, "r.h5"), gc, {}, match="cannot open results file")


def test_agent_data_errors_agreed(gc, tmp):
    ds = data.load_dataset("synthetic-logistic", seed=2, n=60, dim=3)
    path = os.path.join(tmp, "s.h5")
    if R == 0:
        data.write_shards(path, ds, data.partition(ds.y_train, N), seed=2)
    gc.barrier()
    s = data.load_agent_data("synthetic-logistic", shards=path, rank=R, world_size=N, comm=gc)
    assert_all(len(s) > 0 and s.rank == R, "own shard")
    # one rank cannot see the file: every rank raises, none hangs
    where = path if R != N - 1 else os.path.join(tmp, "missing.h5")
    assert_raises_all(MpidlError, data.load_agent_data, "synthetic-logistic", shards=where, rank=R,
                      world_size=N, comm=gc, match="not found")
    assert_raises_all(MpidlError, data.load_agent_data, "synthetic-logistic", shards=path, rank=R,
                      world_size=N + 1, comm=gc, match=f"holds {N} agents")
