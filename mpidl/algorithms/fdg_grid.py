"""The M x K grid layout of the decoupled pipeline: setup, evaluation, checkpoint identity.

``setup_grid(cfg, world)`` (Collective) builds, on every rank (replica m,
stage k):

* the grid communicators (:class:`mpidl.comm.GridComm`, M x K = world size)
  and the driver's own communicator ``mc`` over all ranks;
* replica m's data: part m of M of the training set (the same partition the
  ``centralized`` algorithm gives rank m of an M-rank job), the test set;
* the whole seeded model, cut into K stages at ``[algorithm] cuts`` or, when
  empty, at the cuts that minimise the largest stage cost, the per-unit
  forward + backward time measured on rank 0 on one training batch and
  broadcast (:func:`mpidl.models.balanced_cuts`); rank k keeps stage k;
* the per-sample shapes of every stage boundary (a dry forward), the
  :class:`~mpidl.algorithms.fdg.FDG` algorithm and its initial state.

Evaluation runs the whole pipeline forward on the test set, split over the M
replicas: stage 0 forwards 1000-sample chunks, each stage passes its output
to the next (blocking point-to-point), the last stage scores them, and one
allreduce over all ranks gives every rank the same test loss and accuracy.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from mpidl.algorithms.fdg import FDG, FDGConfig, StageData, staleness
from mpidl.config import register_algorithm
from mpidl.comm import GraphComm, GridComm
from mpidl.errors import MpidlError
from mpidl.flat import FlatModel
from mpidl.layouts import Session, batch_options, load_shard, provenance, steps_per_epoch, user_model
from mpidl.models import balanced_cuts, check_cuts, model_units, slice_model, unit_costs
from mpidl.oracles import as_batch

log = logging.getLogger("mpidl.fdg")

__all__ = ["setup_grid", "GridSession", "grid_shape"]



def grid_shape(acfg, size: int):
    """Local. (M, K) for a world of ``size`` ranks (raises MpidlError on every rank alike)."""
    K = int(acfg.stages)
    M = int(acfg.replicas) or (size // K if K and size % K == 0 else 0)
    if M < 1 or M * K != size:
        raise MpidlError(f"fdg: an M x K grid with K = {K} stages and M = {acfg.replicas or 'auto'} "
                         f"replicas does not fit {size} MPI ranks (M x K must equal the world size); "
                         f"set [algorithm] stages/replicas or start mpiexec -n M*K")
    return M, K


class GridSession(Session):
    """What the driver talks to (see /work/LAYOUT_API.md); one per rank."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def describe(self) -> str:
        a = self.algo
        share = ""
        if self.stage_costs is not None:
            tot = sum(self.stage_costs) or 1.0
            share = ", measured cost share per stage " + "/".join(f"{c / tot:.2f}" for c in self.stage_costs)
        return (f"fdg: {self.M} x {self.K} grid (replicas x stages), cuts {list(self.cuts)} of "
                f"{self.n_units} units{share}, staleness {[staleness(k, self.K) for k in range(self.K)]}, "
                f"beta {a.cfg.beta}, {self.steps_per_epoch} steps/epoch, {a.n_batches} batches fed "
                f"({a.total} iterations, pipeline drained at the end)")

    size_keys = ("grid", "cuts")      # cuts: checked by resize, after the number of stages

    def resize(self, old, like, comm):
        """Collective over ``comm`` (every rank). K stays, M changes: stage k of every new replica
        starts from the average of the old replicas' stage k (parameters, momentum, the
        pipeline's stashes and in-flight messages; :func:`mpidl.resize.average` on the ranks of
        stage k).  A checkpoint of another K raises ResizeError on every rank."""
        from mpidl.resize import ResizeError, average, averaged_names
        grid = str(old.meta.get("grid", ""))
        M_old, _, K_old = grid.partition("x")
        if not (M_old.isdigit() and K_old.isdigit()) or int(K_old) != self.K:
            raise ResizeError(f"fdg: the checkpoint's grid is {grid or 'unknown'} (replicas x stages) and this "
                              f"job's is {self.M}x{self.K}: a resize keeps the number of stages K; set "
                              f"[algorithm] stages = {K_old or '?'} and a world size divisible by it")
        cuts = str(old.meta.get("cuts", ""))
        if cuts != ",".join(map(str, self.cuts)):
            raise ResizeError(f"fdg: the checkpoint cuts the model at {cuts!r}, this job at "
                              f"{','.join(map(str, self.cuts))!r}: set [algorithm] cuts = [{cuts}]")
        M_old = int(M_old)
        sub = comm.Split(self.comm.k, self.comm.m)
        try:
            tree = average(old, like, [m * self.K + self.comm.k for m in range(M_old)], sub)
        finally:
            sub.Free()
        text = (f"fdg grid {M_old}x{self.K} -> {self.M}x{self.K}: stage k of every replica starts from the "
                f"average of the {M_old} old replicas' stage k ({', '.join(averaged_names(like))})")
        return tree, text

    def before_step(self, k):
        pass

    def extra_state(self) -> dict:
        return self.fm.buffers()

    def load_extra_state(self, d):
        self.fm.load_buffers(d)

    def bytes_sent(self) -> float:
        return float(self.comm.bytes_sent)

    def summary(self, ev) -> str:
        return ""

    @torch.no_grad()
    def evaluate(self, state):
        """Collective over mc. Whole-pipeline forward on the test set (split over replicas)."""
        g, fm, k, K = self.comm, self.fm, self.comm.k, self.K
        fm.load(state.x)   # the live weights to the module (a no-op: state.x is its buffer)
        model = fm.model
        model.eval()
        X, Y = self.test_x, self.test_y
        n = len(Y)
        loss_sum, correct = 0.0, 0.0
        dt = fm.params.dtype
        for a in range(0, n, self.eval_chunk):
            c = min(self.eval_chunk, n - a)
            if k == 0:
                h = as_batch(X[a:a + c], dt)
            elif fm.resident:   # the activation arrives in a tensor on the stage's device
                h = g.recv(torch.empty((c,) + self.shapes[k], dtype=dt, device=fm.params.device),
                           -1, g.TAG_EVAL)
            else:
                buf = np.empty((c,) + self.shapes[k], dtype=fm.x.dtype)
                h = torch.from_numpy(g.recv(buf, -1, g.TAG_EVAL))
            out = model(fm.to_device(h))
            if k < K - 1:
                out = out.contiguous()
                g.send(out if fm.resident else out.cpu(), +1, g.TAG_EVAL)
            else:
                yb = fm.to_device(torch.as_tensor(Y[a:a + c]))
                yb = yb.to(dt) if self.algo.num_classes == 0 else yb.long()
                loss_sum += float(self.algo._loss(out, yb)) * c
                if self.algo.num_classes:
                    correct += float((out.argmax(1) == yb).sum())
        last = k == K - 1
        tot = self.mc.allreduce(np.array([loss_sum, correct, n if last else 0], np.float64))
        ev = {"test_loss": float(tot[0] / max(tot[2], 1)),
              "test_acc": float(tot[1] / max(tot[2], 1)) if self.algo.num_classes else float("nan")}
        if not self.algo.num_classes:   # regression: the loss is 1/2 the summed squared error per sample
            ev["test_mse"] = 2.0 * ev["test_loss"] / max(1, int(np.prod(self.shapes[-1])))
        return ev, None

    def close(self):
        self.comm.close()
        self.mc.close()


def _resumed_cuts(cfg, mc):
    """Collective. The cuts recorded in the checkpoint this run will resume from (None if it starts afresh)."""
    from pathlib import Path

    from mpidl.checkpoint import CheckpointStore
    r = cfg.run
    if r.resume == "no":
        return None
    store = CheckpointStore(Path(r.out) / cfg.run_name / "checkpoints", mc)
    step = store.latest() if r.resume == "auto" else int(r.resume)
    if step is None or step not in store.steps():
        return None
    got = store.manifest(step).get("meta", {}).get("cuts")
    return None if got is None else tuple(int(c) for c in str(got).split(",") if c)


def _cuts(cfg, acfg, model, units, K, sample, mc):
    """(cut points, measured stage costs or None): the config's cuts, the checkpoint's, or balanced."""
    name = type(model).__name__
    if acfg.cuts:
        return check_cuts(acfg.cuts, K, len(units), name), None
    check_cuts(tuple(range(1, K)), K, len(units), name)  # K <= number of units
    if K == 1:
        return (), None
    resumed = _resumed_cuts(cfg, mc)
    if resumed is not None and len(resumed) == K - 1:  # measured timings vary: keep the checkpoint's cuts
        return check_cuts(resumed, K, len(units), name), None
    costs = unit_costs(units, sample, repeats=5) if mc.rank == 0 else None
    costs = mc.bcast(costs, root=0)
    cuts = balanced_cuts(costs, K)
    bounds = (0, *cuts, len(units))
    return cuts, [float(sum(costs[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def setup_grid(cfg, world, device=None, cuda_aware=False):
    """Collective over ``world``. Build the grid session of the ``fdg`` algorithm (see the module doc).

    ``device``: the torch device of this rank's stage.  On a GPU the stage is device-resident
    (:mod:`mpidl.flat`): module, graphs, batches, stashes, messages and the optimizer state
    live there; the messages and the stage allreduce go through pinned host mirrors, or
    straight to MPI with ``cuda_aware`` (a CUDA-aware MPI, :class:`mpidl.comm.GridComm`).
    """
    from mpidl import topology as T
    acfg, d, r = cfg.algorithm, cfg.data, cfg.run
    size = world.Get_size()
    if not cfg.model.factory and cfg.model.name not in ("mlp", "cnn", "resnet20", "linear"):
        raise MpidlError(f"fdg cuts torch models into stages (mlp, cnn, resnet20, linear, or a model "
                         f"factory's nn.Sequential), not {cfg.model.name!r}")
    M, K = grid_shape(acfg, size)
    torch.set_num_threads(max(1, r.threads))
    mc = GraphComm(world, T.ring(size))
    try:
        grid = GridComm(world, M, K, progress=cfg.comm.progress, **({"cuda_aware": True} if cuda_aware else {}))
    except Exception:
        mc.close()
        raise
    try:
        return _setup(cfg, acfg, d, r, mc, grid, M, K, device)
    except Exception:
        grid.close()
        mc.close()
        raise


def _cuttable(model) -> bool:
    try:
        model_units(model)
    except MpidlError:
        return False
    return True


def _setup(cfg, acfg, d, r, mc, grid, M, K, device=None):
    m, k = grid.m, grid.k
    shard = load_shard(cfg, mc, m, M)
    if r.batch_size == 0:
        raise MpidlError("fdg needs minibatches: set [run] batch_size > 0")
    batch = r.batch_size
    batch, spe = steps_per_epoch(mc, len(shard.y), batch)
    total = r.steps if r.steps > 0 else max(1, int(math.ceil(r.epochs * spe)))
    dtype = torch.float64 if cfg.model.dtype == "float64" else torch.float32
    model = user_model(cfg, shard, mc, dtype)
    whole = K == 1 and not _cuttable(model)     # K = 1 runs any module as one stage
    units = [model] if whole else model_units(model)
    sample = as_batch(shard.x[:batch], dtype)
    cuts, stage_costs = _cuts(cfg, acfg, model, units, K, sample, mc)
    stages = [model] if whole else slice_model(model, K, cuts)
    shapes = [tuple(shard.input_shape)]
    with torch.no_grad():
        h = torch.zeros((2,) + tuple(shard.input_shape), dtype=dtype)
        for s in stages:
            s.eval()
            h = s(h)
            shapes.append(tuple(h.shape[1:]))
    fm = FlatModel(stages[k], dtype, device=device)
    grid.stage.attach(fm)       # [comm] progress of the pipeline's messages during the stage's compute
    algo = FDG(acfg, fm=fm, k=k, K=K, batch=batch, shapes=shapes, steps_per_epoch=spe, total_steps=total,
               loss=cfg.model.loss, num_classes=shard.num_classes)
    state = algo.init(fm.x, grid)
    opts = batch_options(cfg, shard)
    data = StageData(shard.x if k == 0 else shard.x[:0], shard.y, batch=batch, steps_per_epoch=spe,
                     seed=r.seed, replica=m, dtype=dtype, num_classes=shard.num_classes, augment=d.augment,
                     shuffle=opts["shuffle"], block=opts["block"], buffer=opts["buffer"])
    test_x, test_y = shard.x_test[m::M], shard.y_test[m::M]
    sess = GridSession(mc=mc, algo=algo, state=state, comm=grid, oracle=data, data=data,
                       steps_per_epoch=spe, total=total, fm=fm, M=M, K=K, cuts=cuts, n_units=len(units),
                       stage_costs=stage_costs, shapes=shapes, test_x=test_x, test_y=test_y, eval_chunk=1000,
                       expect={"algorithm": "fdg", "grid": f"{M}x{K}", "cuts": ",".join(map(str, cuts)),
                               **provenance(cfg)})
    return sess


register_algorithm("fdg", FDGConfig, FDG, layout=setup_grid)
