"""GraphComm under mpiexec: mix == row i of W @ X for every generator and size."""
import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpiutil import agent_data, assert_all, assert_raises_all
from mpidl import topology as T
from mpidl.comm import CollectiveError, GraphComm, ScheduledGraphComm
from reference.stacked import mix as stacked_mix

MPI_SIZES = (1, 2, 3, 4)
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()


def _generators(n):
    yield T.ring(n)
    yield T.path(n)
    yield T.star(n)
    yield T.complete(n)
    yield T.torus(n)
    yield T.exponential(n)
    yield T.erdos_renyi(n, 0.5, seed=3)
    yield T.ring(n, weights="max-degree")
    yield T.ring(n, weights="lazy")
    yield T.star(n, weights="uniform")
    if n & (n - 1) == 0:
        yield T.hypercube(n)


def _tol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-13


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (1,)])
def test_mix_matches_stacked_reference(dtype, shape):
    for topo in _generators(N):
        X = agent_data(N, shape, dtype, seed=11)
        expect = stacked_mix(topo.weights, X.reshape(N, -1).astype(np.float64)).reshape(X.shape)[R]
        with GraphComm(W, topo) as gc:
            got = gc.mix(X[R].copy())
            x = X[R].copy()
            inplace = gc.mix(x, out=x)
        assert_all(got.shape == shape and got.dtype == dtype, f"{topo.name}: shape/dtype {got.shape} {got.dtype}")
        assert_all(np.allclose(got, expect, rtol=_tol(dtype), atol=_tol(dtype)), f"{topo.name}: mix != W @ X")
        assert_all(inplace is x and np.array_equal(x, got), f"{topo.name}: in-place mix differs")


def test_repeated_mix_reuses_plan_and_converges():
    topo = T.ring(N)
    X = agent_data(N, (50,), np.float64, seed=1)
    ref = X.copy()
    x = X[R].copy()
    with GraphComm(W, topo) as gc:
        for _ in range(30):
            gc.mix(x, out=x)
            ref = topo.weights @ ref
        assert_all(len(gc._plans) == 1, "a repeated in-place mix must reuse one plan")
    assert_all(np.allclose(x, ref[R], atol=1e-12), "30 rounds differ from W^30 X")
    if N > 1:
        assert_all(np.abs(x - X.mean(0)).max() < np.abs(X[R] - X.mean(0)).max(), "no contraction")


@pytest.mark.parametrize("persistent", [True, False])
def test_torch_tensor_zero_copy_and_nonblocking(persistent):
    topo = T.exponential(N)
    X = agent_data(N, (4, 6), np.float32, seed=5)
    expect = (topo.weights @ X.reshape(N, -1).astype(np.float64)).reshape(X.shape)[R]
    t = torch.from_numpy(X[R].copy())
    ptr = t.data_ptr()
    with GraphComm(W, topo, persistent=persistent) as gc:
        out = gc.mix(t)
        assert_all(isinstance(out, torch.Tensor) and out.shape == t.shape, "torch in, torch out")
        # zero copy: MPI sends straight from t's storage (the plan's send buffer IS t's memory)
        sends = [p.send.__array_interface__["data"][0] for p in gc._plans.values()]
        assert_all(sends == [ptr], f"send buffer {sends} is not the tensor's storage {ptr}")
        assert_all(out.data_ptr() != ptr, "out-of-place mix wrote into the input")
        pend = gc.start_mix(t, out=t)
        busy = np.ones(1000).sum()  # overlapping work
        res = pend.wait()
        assert_all(res is t and busy == 1000.0, "start_mix(out=t).wait() returns t")
        assert_all(t.data_ptr() == ptr and len(gc._plans) == 1, "in-place mix moved or copied the tensor")
    assert_all(np.allclose(out.numpy(), expect, atol=1e-5), "torch mix != W @ X")
    assert_all(np.allclose(t.numpy(), expect, atol=1e-5), "in-place torch mix != W @ X")


def test_bytes_and_messages_counters():
    topo = T.star(N)
    x = np.ones(100, dtype=np.float32)
    with GraphComm(W, topo) as gc:
        gc.mix(x)
        gc.mix(x, out=x)
        deg = len(topo.out_neighbors(R))
        assert_all(gc.messages_sent == 2 * deg, f"messages {gc.messages_sent} != 2 x {deg}")
        assert_all(gc.bytes_sent == 2 * deg * 400, f"bytes {gc.bytes_sent} != 2 x {deg} x 400")
        gc.reset_counters()
        gc.exchange({j: np.zeros(3) for j in topo.out_neighbors(R)})
        assert_all(gc.bytes_sent == deg * 24 and gc.messages_sent == deg, "exchange counters")


def test_exchange_round_trip():
    topo = T.exponential(N)
    with GraphComm(W, topo) as gc:
        send = {j: np.full((R + 1, j + 1), 10 * R + j, dtype=np.int64 if j % 2 else np.float32)
                for j in topo.out_neighbors(R)}
        got = gc.exchange(send)
        ok = set(got) == set(topo.in_neighbors(R))
        for i, a in got.items():
            ok &= a.shape == (i + 1, R + 1) and a.dtype == (np.int64 if R % 2 else np.float32)
            ok &= bool(np.all(a == 10 * i + R))
        assert_all(ok, f"exchange payloads wrong: {[(i, a.shape) for i, a in got.items()]}")
        # a partial send: only the first out-neighbour gets something
        outs = topo.out_neighbors(R)
        got = gc.exchange({outs[0]: np.arange(4.0)} if outs else {})
        ok = all(np.array_equal(a, np.arange(4.0)) for a in got.values())
        ok &= all(topo.out_neighbors(i)[0] == R for i in got)
        assert_all(ok, "partial exchange")


def test_exchange_to_non_neighbour_fails_everywhere():
    if N < 4:
        pytest.skip("needs a non-neighbour (ring with at least 4 agents)")
    topo = T.ring(N)
    with GraphComm(W, topo) as gc:
        far = (R + 2) % N
        send = {far: np.zeros(1)} if R == 0 else {}
        assert_raises_all(CollectiveError, gc.exchange, send, match="not out-neighbours")
        # the communicator still works after the agreed error
        assert_all(np.allclose(gc.mix(np.full(3, 1.0)), 1.0), "mix after error")


def test_allreduce_argmin_bcast():
    with GraphComm(W, T.ring(N)) as gc:
        assert_all(gc.allreduce(R + 1) == N * (N + 1) // 2, "scalar sum")
        assert_all(abs(gc.allreduce(float(R), op="mean") - (N - 1) / 2) < 1e-12, "scalar mean")
        a = np.full(5, float(R))
        assert_all(np.all(gc.allreduce(a, op="max") == N - 1), "array max")
        gc.allreduce(a, op="mean", out=a)
        assert_all(np.allclose(a, (N - 1) / 2), "in-place mean")
        t = torch.full((2, 2), float(R))
        gc.allreduce(t, op="min", out=t)
        assert_all(bool((t == 0).all()), "torch in-place min")
        v, owner = gc.argmin(abs(R - (N - 1) / 2) + 0.25 * (R == N - 1))
        expect = int(np.argmin([abs(r - (N - 1) / 2) + 0.25 * (r == N - 1) for r in range(N)]))
        assert_all(owner == expect, f"argmin owner {owner} != {expect}")
        b = np.arange(4.0) if R == 0 else np.zeros(4)
        gc.bcast(b)
        assert_all(np.array_equal(b, np.arange(4.0)), "array bcast")
        assert_all(gc.bcast({"k": 1} if R == 0 else None) == {"k": 1}, "object bcast")
        gc.barrier()


def test_agree_raises_everywhere():
    with GraphComm(W, T.ring(N)) as gc:
        gc.agree(None)
        e = assert_raises_all(CollectiveError, gc.agree, "bad shard" if R == N - 1 else None)
        assert_all("bad shard" in str(e), str(e))


def test_size_mismatch_raises_on_every_rank():
    assert_raises_all(T.TopologyError, GraphComm, W, T.ring(N + 1), match=f"{N} ranks")


def test_inconsistent_topology_raises_on_every_rank():
    if N < 3:
        pytest.skip("needs 3 agents for two different connected graphs")
    topo = T.path(N) if R else T.complete(N)
    assert_raises_all(T.TopologyError, GraphComm, W, topo, match="disagree")


def test_time_varying_schedules():
    for sched in (T.one_peer_exponential(N), T.random_matching(N, seed=4)):
        X = agent_data(N, (9,), np.float64, seed=2)
        ref = X.copy()
        x = X[R].copy()
        with ScheduledGraphComm(W, sched, cache=2) as sg:
            for k in range(6):
                sg.mix(x, k, out=x)
                ref = sched(k).weights @ ref
            # exact count: 9 float64 to every out-neighbour of this rank in W_k (receivers i != R
            # with W_k[i, R] != 0), summed over the steps, including evicted communicators
            expect = sum(72 * int(np.count_nonzero(np.delete(sched(k).weights[:, R], R))) for k in range(6))
            assert_all(sg.bytes_sent == expect, f"bytes_sent {sg.bytes_sent} != {expect}")
            assert_all(len(sg._cache) <= 2, "cache bound")
        assert_all(np.allclose(x, ref[R], atol=1e-13), "scheduled mix != product of W_k")
        # the average is preserved (doubly stochastic schedule members)
        assert_all(np.isclose(W.allreduce(x.sum()), X.sum(), atol=1e-9), "average not preserved")


def test_bad_input_types():
    with GraphComm(W, T.ring(N)) as gc:
        assert_raises_all(TypeError, gc.mix, np.arange(3))
        assert_raises_all(ValueError, gc.mix, np.ones((4, 4))[:, ::2])


def test_fast_path_follows_moved_buffers_and_eviction():
    topo = T.ring(N)
    X = agent_data(N, (40,), np.float64, seed=9)
    expect = topo.weights @ X
    with GraphComm(W, topo, plan_cache=1) as gc:
        t = torch.from_numpy(X[R].copy())
        gc.mix(t, out=t)                                   # caches the fast path
        t.set_(torch.from_numpy(X[R].copy()))              # same object, new storage
        gc.mix(t, out=t)
        ok = np.allclose(t.numpy(), expect[R], atol=1e-13)
        x, y = X[R].copy(), X[R].copy()
        gc.mix(x, out=x)
        gc.mix(y, out=y)                                   # evicts x's plan (cache of 1)
        gc.mix(x, out=x)                                   # x again: a fresh plan, still right
        ok &= np.allclose(y, expect[R], atol=1e-13)
        ok &= np.allclose(x, (topo.weights @ expect)[R], atol=1e-13)
        ok &= len(gc._plans) == 1
    assert_all(ok, "mix fast path used a stale buffer or plan")
