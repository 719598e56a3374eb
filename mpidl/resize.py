"""Resize: continue a checkpoint written by N ranks on a job of M ranks (``[run] resize = "average"``).

A resize is a checkpoint transform: N agents' states -> M agents' states,
applied once at resume (:func:`resume_resized`, called by the driver's resume
when the checkpoint's world size differs from the job's); the training loop
never learns about it.  Each layout declares its transform with
``Session.resize(old, like, comm) -> (tree, text)`` and the expect keys that
depend on the size (``Session.size_keys``):

* **average** (the consensus agents; fdg stage by stage): every floating-point
  array of the state (parameters, momentum, NEXT's tracking variable y and last
  gradient g, BatchNorm statistics, fdg's stashes and in-flight messages) :=
  the mean over the old ranks of the group (all old agents; the old replicas of
  the same stage for fdg); every other entry (step counters, NEXT's alpha,
  integer buffers) comes from the group's first old rank (:func:`average`).
* **leader / centre** (LSGD / EASGD): the algorithm's ``resize_state`` hook
  (:mod:`mpidl.algorithms.lsgd`): every worker starts from the leader's
  (the centre's) parameters; groups and windows are rebuilt for M.
* **not possible** (pdADMM: ranks hold different layers, not copies of one
  model): :class:`ResizeError` on every rank, before anything is read or written.

How the mean is computed (Collective over the group's new ranks): the new rank
at position p of the S new ranks of a group reads the group's old ranks
``members[p::S]`` (every old file is read by one rank only) and sums them in
float64, in increasing rank order; one ``MPI_Allreduce`` (sum) over the group;
the sum is divided by ``len(members)`` and cast to the array's dtype.  For a
float32 model the float64 sums are exact, so the result is the mean itself
rounded once.

The driver's own counters continue as totals: the bytes sent so far and the
open training-metric window are summed over the old ranks and held by new rank
0 (the logged rows sum over the ranks).  RNG states are not restored: a rank's
batches are a function of (seed, rank, step), and the new ranks keep the RNGs
a fresh job of M ranks starts with.  The data is repartitioned for M ranks
with the same scheme and seed (the layout loads it for this job's size); the
step counter and the learning-rate schedule continue from the checkpoint's
step.  The same rules serve :meth:`mpidl.optim.Consensus.load_state_dict` and
the other own-loop wrappers (:class:`MemoryRanks`).
"""
from __future__ import annotations

import logging

import numpy as np

from mpidl.checkpoint import CheckpointError
from mpidl.errors import MpidlError
from mpidl.h5state import open_read, read_path, read_tree

__all__ = ["ResizeError", "OldRanks", "MemoryRanks", "average", "agreed", "leaves", "resume_resized"]

log = logging.getLogger("mpidl.resize")


class ResizeError(CheckpointError):
    """A checkpoint that cannot continue on this number of ranks (raised on every rank)."""


# -- the old ranks' states (Local reads) ----------------------------------------------
class OldRanks:
    """Local. Read access to the per-rank files of checkpoint ``step`` written by ``n`` ranks.

    ``read(i, path)`` returns old rank i's state tree, or one entry of it
    (``"algo"``, ``"algo/x"``); each file is checked against the manifest
    (size, CRC-32) the first time this process reads it.
    """

    def __init__(self, store, step: int, manifest: dict):
        self.store, self.step, self.manifest = store, int(step), manifest
        self.n = int(manifest["world_size"])
        self.meta = manifest.get("meta", {}) or {}
        self._files = {}

    def read(self, rank: int, path: str = ""):
        fpath = self._files.get(rank)
        if fpath is None:
            fpath = self._files[rank] = self.store.verify_file(self.step, rank, self.manifest)
        with open_read(fpath) as f:
            return read_path(f["state"], path) if path else read_tree(f["state"])


class MemoryRanks:
    """Local. The same read access over state trees held in memory (one per old rank, in rank order)."""

    def __init__(self, trees, meta=None):
        self.trees, self.n, self.meta = list(trees), len(trees), meta or {}

    def read(self, rank: int, path: str = ""):
        t = self.trees[rank]
        for key in filter(None, path.split("/")):
            t = t[key]
        return t


# -- helpers ------------------------------------------------------------------------
def agreed(comm, fn, *args):
    """Collective over ``comm`` (mpi4py). ``fn(*args)``; an error on any rank is raised on every
    rank as one :class:`ResizeError` (the lowest failing rank's message)."""
    err, out = None, None
    try:
        out = fn(*args)
    except (MpidlError, OSError, KeyError, ValueError, TypeError, IndexError) as e:
        err = str(e) or type(e).__name__
        if isinstance(e, KeyError):
            err = f"the checkpoint lacks {e}"
    errs = comm.allgather(err)
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        n = sum(e is not None for e in errs)
        raise ResizeError(first + (f" (and {n - 1} other rank(s))" if n > 1 else ""))
    return out


def leaves(tree, prefix=()):
    """Local. ``(path tuple, value)`` of every non-dict entry of a nested dict, in order."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _floating(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind == "f"


def average(old, like: dict, members, comm) -> dict:
    """Collective over ``comm`` (mpi4py: the new ranks of one group). A tree shaped like ``like``:
    its floating-point arrays the mean over the old ranks ``members``, every other entry old rank
    ``members[0]``'s (see the module docstring for the order of the sums)."""
    from mpi4py import MPI
    p, S = comm.Get_rank(), comm.Get_size()
    items = list(leaves(like))
    fl = [(path, v) for path, v in items if _floating(v)]
    spans, a = [], 0
    for _, v in fl:
        spans.append((a, a + v.size))
        a += v.size
    acc = np.zeros(a, dtype=np.float64)

    def read_mine():
        for i in members[p::S]:
            tree = {k: old.read(i, k) for k in like}
            for (path, v), (lo, hi) in zip(fl, spans):
                got = _get(tree, path)
                if not isinstance(got, np.ndarray) or got.shape != v.shape:
                    shape = getattr(got, "shape", type(got).__name__)
                    raise ResizeError(f"old rank {i}: {'/'.join(path)} has shape {shape}, this job expects "
                                      f"{v.shape}: the checkpoint was written by another model or algorithm")
                acc[lo:hi] += got.ravel()
        if p != 0:
            return None
        tree = {k: old.read(members[0], k) for k in like}
        return {path: _get(tree, path) for path, v in items if not _floating(v)}
    rest = agreed(comm, read_mine)
    if S > 1:
        comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)
        rest = comm.bcast(rest, root=0)
    acc /= len(members)
    out = {}
    for path, v in items:
        if _floating(v):
            lo, hi = spans[[q for q, _ in fl].index(path)]
            _set(out, path, acc[lo:hi].reshape(v.shape).astype(v.dtype))
        else:
            _set(out, path, rest[path])
    return out


def averaged_names(like: dict) -> list:
    """Local. ``algo/x``-style names of the floating-point arrays :func:`average` averages."""
    return ["/".join(p) for p, v in leaves(like) if _floating(v) and v.size]


# -- the driver's resume ------------------------------------------------------------
def resume_resized(cfg, session, store, step: int, man: dict, counters: dict):
    """Collective over ``session.mc``. Resume checkpoint ``step`` (manifest ``man``) written by
    another number of ranks; return ``(step, event)`` where ``event`` is the results file's record.

    ``[run] resize = "no"`` raises the world-size error naming the key; otherwise the
    layout's transform (``session.resize``) builds this rank's state, which replaces
    ``session.state`` and the buffers; ``counters`` (the driver's) get the old totals on rank 0.
    """
    from mpidl.algorithms.base import state_from_dict, state_to_dict
    mc = session.mc
    n_old, n_new = int(man.get("world_size")), mc.size
    where = store.path(step)
    if cfg.run.resize == "no" and getattr(session, "resizable", True):
        raise ResizeError(f"checkpoint {where} was written by {n_old} ranks but this job has {n_new}; resume "
                          f"with mpiexec -n {n_old}, or set [run] resize = \"average\" to continue on {n_new} "
                          "ranks (docs/checkpoints.md)")
    skip = set(getattr(session, "size_keys", ()))
    for key, want in session.expect.items():
        if key in skip:
            continue
        got = man[key] if key in man else man.get("meta", {}).get(key, "<not recorded>")
        if got != want:
            raise ResizeError(f"checkpoint {where}: {key} is {got!r} but this run has {want!r}; a resize "
                              "keeps every setting but the number of ranks")
    old = OldRanks(store, step, man)
    like = {"algo": state_to_dict(session.state), "buffers": session.extra_state()}
    comm = mc.base
    tree, text = session.resize(old, like, comm)

    def driver_totals():
        tot = {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in counters.items()}
        for i in range(comm.Get_rank(), n_old, comm.Get_size()):
            d = old.read(i, "driver")
            for k in tot:
                tot[k] += np.asarray(d[k], dtype=np.float64).reshape(tot[k].shape)
        return tot
    tot = agreed(comm, driver_totals)

    def install():
        session.state = state_from_dict(session.algo.state_cls, tree["algo"], like=session.state)
        session.load_extra_state(tree.get("buffers", {}))
    agreed(comm, install)
    from mpi4py import MPI
    for k, buf in counters.items():
        t = tot[k]
        comm.Allreduce(MPI.IN_PLACE, t, op=MPI.SUM)
        buf[...] = t if mc.rank == 0 else 0.0
    msg = (f"resize: checkpoint step {step} in {store.root} was written by {n_old} ranks, this job has "
           f"{n_new}: {text}; the data is repartitioned for {n_new} ranks ({session.steps_per_epoch} steps "
           f"per epoch now); step counter and learning-rate schedule continue; the RNG states are this job's own")
    log.info("%s", msg)
    event = {"kind": "resize", "step": int(step), "from": n_old, "to": n_new, "what": text}
    return int(step), event
