"""CheckpointStore under mpiexec: per-agent round trip, agreement, errors raised on every rank."""
import json
import os

import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl.checkpoint import CheckpointError, CheckpointStore, PreemptionGuard, rng_state, topology_digest

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 240
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
LAST = N - 1


@pytest.fixture
def root(shared_tmp):
    return os.path.join(shared_tmp, "ckpt")


def _state(rank, step):
    rng = np.random.default_rng(1000 * rank + step)
    return {"algo": {"x": rng.standard_normal(10 + rank).astype(np.float32), "k": step, "lr": 0.5 / (rank + 1)},
            "rng": rng_state(rng), "agent": f"agent-{rank}"}


def _same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


def test_round_trip_every_agent(root, gc):
    store = CheckpointStore(root, gc, keep=2)
    assert_all(store.latest() is None, "empty root has no latest")
    for step in (3, 6, 9):
        store.save(step, _state(R, step), {"algorithm": "cdsgd", "config": {"n": N}})
    assert_all(store.steps() == [6, 9], f"keep=2 left {store.steps()}")
    assert_all(W.allgather(store.latest()) == [9] * N, "latest differs between ranks")
    state, meta = store.load(9, like=_state(R, 9),
                             expect={"algorithm": "cdsgd", "topology": topology_digest(gc.topology)})
    assert_all(_same(state, _state(R, 9)), "state differs after round trip")
    assert_all(meta == {"algorithm": "cdsgd", "config": {"n": N}}, f"meta {meta}")
    man = store.manifest(9)
    assert_all(man["world_size"] == N and len(man["files"]) == N and man["topology_name"] == gc.topology.name,
               "manifest")
    # bookkeeping collectives are not charged to the algorithm's counters
    assert_all(gc.bytes_sent == 0 and gc.messages_sent == 0, f"counters {gc.bytes_sent}")


def test_mismatch_errors_on_every_rank(root, gc):
    store = CheckpointStore(root, gc)
    store.save(1, _state(R, 1), {"algorithm": "cdsgd"})
    assert_raises_all(CheckpointError, store.load, 1, expect={"topology": "0123"}, match="topology is")
    assert_raises_all(CheckpointError, store.load, 1, expect={"algorithm": "fedavg"}, match="'cdsgd'")
    like = _state(R, 1)
    if R == LAST:  # only one rank sees a different shape
        like["algo"]["x"] = np.zeros(3, np.float32)
    e = assert_raises_all(CheckpointError, store.load, 1, like=like, match="does not fit this run")
    assert_all(f"rank {LAST}" in str(e), str(e))
    if R == 0:
        mp = os.path.join(store.path(1), "manifest.json")
        man = json.load(open(mp))
        man["world_size"] = N + 1
        json.dump(man, open(mp, "w"))
    gc.barrier()
    assert_raises_all(CheckpointError, store.load, 1, match=f"written by {N + 1} ranks but this job has {N}")


def test_corrupt_or_missing_file_of_one_rank(root, gc):
    store = CheckpointStore(root, gc, keep=None)
    store.save(1, _state(R, 1))
    store.save(2, _state(R, 2))
    if R == LAST:
        f = os.path.join(store.path(2), f"rank_{LAST:05d}.h5")
        raw = bytearray(open(f, "rb").read())
        raw[-50] ^= 0x01
        open(f, "wb").write(bytes(raw))
    gc.barrier()
    e = assert_raises_all(CheckpointError, store.load, 2, match="damaged")
    assert_all(f"rank {LAST}" in str(e), str(e))
    if R == LAST:
        os.remove(os.path.join(store.path(2), f"rank_{LAST:05d}.h5"))
    gc.barrier()
    assert_raises_all(CheckpointError, store.load, 2, match="missing")
    state, _ = store.load(1, like=_state(R, 1))  # the older one is still fine
    assert_all(_same(state, _state(R, 1)), "step 1")


def test_failed_save_on_one_rank_fails_everywhere_and_keeps_previous(root, gc):
    store = CheckpointStore(root, gc)
    store.save(1, _state(R, 1))
    bad = _state(R, 2)
    if R == LAST:
        bad["oops"] = object()
    assert_raises_all(CheckpointError, store.save, 2, bad, match=f"rank {LAST}: cannot write")
    assert_all(store.latest() == 1, "a failed save must not become latest")
    assert_all(not os.path.exists(store.path(2) + ".tmp") or R != 0, "tmp folder left behind")
    store.save(2, _state(R, 2))
    assert_all(store.latest() == 2, "save after a failure")


def test_guard_agrees_when_one_rank_is_signalled(gc):
    """The answer comes one call late (a nonblocking reduction) but at the same call on every rank."""
    with PreemptionGuard(gc) as guard:
        for _ in range(3):
            assert_all(not guard.should_stop(), "no signal yet")
        if R == LAST:
            guard.request()
        assert_all(not guard.should_stop(), "the reduction started before the signal says no")
        assert_all(guard.should_stop(), "every rank must stop one call after one rank was signalled")
        assert_all(guard.should_stop(), "a stop stays a stop")


def test_guard_agrees_under_random_signal_timing(gc):
    """Signals at random calls on random ranks: every rank stops at the same call, the call after
    the first signal was contributed (an independent count of calls, not the guard's)."""
    rng = np.random.default_rng(7)
    for trial in range(5):
        when = rng.integers(0, 6, size=gc.size)      # the same draw on every rank
        who = rng.random(gc.size) < 0.5
        who[rng.integers(gc.size)] = True            # at least one rank is signalled
        first = int(when[who].min())
        with PreemptionGuard(gc) as guard:
            stopped_at = None
            for call in range(10):
                if who[R] and call == when[R]:
                    guard.request()
                if guard.should_stop():
                    stopped_at = call
                    break
        calls = gc.base.allgather(stopped_at)
        assert_all(len(set(calls)) == 1, f"trial {trial}: ranks stopped at different calls {calls}")
        assert_all(stopped_at == first + 1, f"trial {trial}: stopped at {stopped_at}, first signal at {first}")
