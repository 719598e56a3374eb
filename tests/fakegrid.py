"""An M x K grid of fdg ranks as threads of one process (serial tests; no MPI).

Each rank (replica m, stage k) runs in its own thread with a stand-in for its
:class:`mpidl.comm.GridComm` (``FakeGrid``) and for the driver's
communicator (``FakeMC``).  Messages follow MPI's rules as fdg uses them:
a send to stage k + direction (direction +1 or -1, anything else a
ValueError as in ``GridComm._peer``) is matched, in order, by the receive
that stage posts with the same tag; a message longer than the receive
buffer is an error (MPI truncation).  Collectives (sum / mean / min / max,
bcast, agree) combine the values of their group in rank order.  A rank that
raises ends the run: the others stop waiting and ``run_grid`` re-raises the
first error, so a mutant that loses a message fails in seconds.
"""
import collections
import queue
import threading
import time

import numpy as np
import torch

from mpidl.comm import CollectiveError
from mpidl.comm.grid import GridComm

WAIT = 30.0  # seconds a rank waits for a message or a collective before the run fails


class _World:
    def __init__(self, M, K):
        self.M, self.K = M, K
        self.lock = threading.Lock()
        self.boxes = collections.defaultdict(queue.Queue)   # (m, dst k, src k, tag) -> messages
        self.groups = {}                                      # group key -> (barrier, slots)
        self.failed = threading.Event()

    def _group(self, key, n):
        with self.lock:
            if key not in self.groups:
                self.groups[key] = (threading.Barrier(n, timeout=WAIT), [None] * n)
            return self.groups[key]

    def gather(self, key, n, i, value):
        """All n values of group ``key`` (this member is i), on every member."""
        bar, slots = self._group(key, n)
        slots[i] = value
        bar.wait()
        out = list(slots)
        bar.wait()
        return out

    def abort(self):
        self.failed.set()
        with self.lock:
            for bar, _ in self.groups.values():
                bar.abort()

    def take(self, key):
        end = time.monotonic() + WAIT
        while time.monotonic() < end and not self.failed.is_set():
            try:
                return self.boxes[key].get(timeout=0.1)
            except queue.Empty:
                pass
        raise TimeoutError(f"no message for {key}")


def _reduce(vals, op):
    arr = [np.asarray(v, dtype=np.float64) if isinstance(v, np.ndarray) else v for v in vals]
    if op in ("sum", "mean"):
        tot = arr[0]
        for v in arr[1:]:
            tot = tot + v
        return tot / len(arr) if op == "mean" else tot
    return {"min": min, "max": max}[op](arr) if not isinstance(arr[0], np.ndarray) else \
        {"min": np.minimum, "max": np.maximum}[op].reduce(np.stack(arr))


class FakeMC:
    """The driver's communicator over all M x K ranks (rank = m K + k)."""

    def __init__(self, world, rank):
        self.w, self.rank, self.size = world, rank, world.M * world.K
        self._n = 0

    def _all(self, value):
        self._n += 1
        return self.w.gather(("mc", self._n), self.size, self.rank, value)

    def allreduce(self, x, op="sum"):
        out = _reduce(self._all(x), op)
        return np.array(out) if isinstance(x, np.ndarray) else type(x)(out)

    def bcast(self, obj, root=0):
        return self._all(obj)[root]

    def agree(self, error=None):
        errs = [e for e in self._all(error) if e is not None]
        if errs:
            raise CollectiveError(errs[0])

    def close(self):
        pass


class _NoProgress:
    """The stage communicator's progress engine, as far as the thread grid needs it (``[comm]
    progress = "none"``: nothing to hook)."""

    def attach(self, fm):
        return self


class FakeGrid:
    """Rank (m, k)'s GridComm: point to point along replica m's path, allreduce over stage k's copies."""

    TAG_ACT, TAG_GRAD, TAG_EVAL = 11, 12, 13

    def __init__(self, world, m, k):
        self.w, self.M, self.K, self.m, self.k = world, world.M, world.K, m, k
        self._pending, self._n = [], 0
        self.bytes_sent = 0
        self.stage = _NoProgress()

    _peer = GridComm._peer          # the real direction checks (they read only k and K)

    def isend(self, x, direction, tag):
        a = (x.detach().numpy() if torch.is_tensor(x) else np.asarray(x)).copy()
        self.w.boxes[(self.m, self._peer(direction), self.k, tag)].put(a)
        self.bytes_sent += a.nbytes

    def irecv(self, out, direction, tag):
        self._pending.append((out, (self.m, self.k, self._peer(direction), tag)))

    def waitall(self):
        pending, self._pending = self._pending, []
        for out, key in pending:
            a = self.w.take(key)
            n = int(np.prod(out.shape))
            if a.size > n:
                raise RuntimeError(f"message of {a.size} elements truncated into {n} ({key})")
            if torch.is_tensor(out):      # a device-resident buffer (a CPU tensor here)
                out.reshape(-1)[:a.size].copy_(torch.from_numpy(a.reshape(-1)))
            else:
                out.reshape(-1)[:a.size] = a.reshape(-1)

    def send(self, x, direction, tag):
        self.isend(x, direction, tag)

    def recv(self, out, direction, tag):
        self.irecv(out, direction, tag)
        self.waitall()
        return out

    def allreduce_stage(self, x, op="mean", out=None):
        self._n += 1
        res = _reduce(self.w.gather(("stage", self.k, self._n), self.M, self.m,
                                     x.detach().numpy().copy() if torch.is_tensor(x) else np.array(x)), op)
        if out is None:
            return res
        if torch.is_tensor(out):
            out.copy_(torch.from_numpy(np.asarray(res)).reshape(out.shape))
        else:
            out[...] = res
        return out

    def close(self):
        pass


def run_grid(M, K, fn):
    """{(m, k): fn(m, k, FakeMC, FakeGrid)} with every rank in its own thread; re-raises the first error."""
    world = _World(M, K)
    results, errors = {}, []

    def rank(m, k):
        try:
            results[(m, k)] = fn(m, k, FakeMC(world, m * K + k), FakeGrid(world, m, k))
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(e)
            world.abort()

    threads = [threading.Thread(target=rank, args=(m, k)) for m in range(M) for k in range(K)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results
