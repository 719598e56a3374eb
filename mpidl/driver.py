"""Training driver: config -> communicator -> data -> model -> algorithm -> loop.

``train(cfg, world)`` is Collective over ``world`` (an mpi4py communicator).
Every rank runs the same number of steps: the steps per epoch are the minimum
over agents of ``len(shard) // batch_size`` (one allreduce).  Per step the
algorithm makes its own collectives; the driver adds, at most once per step,
the preemption check (one scalar allreduce) and, at the log / eval /
checkpoint cadence, metric reductions on a separate communicator so the
algorithm's byte counters stay exact.

Non-finite losses are noted locally at every step and agreed at each log,
eval and checkpoint boundary (before any save), so a diverging run stops with
one message naming the first bad step and agent, and the newest checkpoint is
one taken before it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from mpidl import config as C
from mpidl import topology as T
import torch

from mpidl.algorithms.base import state_from_dict, state_to_dict
from mpidl.checkpoint import CheckpointStore, PreemptionGuard, rng_state, set_rng_state, topology_digest
from mpidl.comm import GraphComm, ScheduledGraphComm
from mpidl.data import load_agent_data
from mpidl.errors import MpidlError
from mpidl.flat import FlatModel
from mpidl.metrics import Progress, Recorder
from mpidl.models import build_model
from mpidl.oracles import TorchOracle

log = logging.getLogger("mpidl.driver")

__all__ = ["train", "build_topology", "DivergenceError", "CONVEX_MODELS"]

CONVEX_MODELS = {"convex-logistic": "logistic", "convex-lsq": "lsq"}
"""Model names served by the Numba convex oracles instead of a torch model."""


class DivergenceError(MpidlError):
    """The loss became NaN or infinite."""


def build_topology(tc: C.TopologyConfig, n: int):
    """Local. The fixed topology (and schedule, or None) a config describes, for ``n`` agents."""
    kw = {}
    if tc.name == "erdos_renyi":
        kw.update(p=tc.p, seed=tc.seed)
    if tc.name == "torus" and tc.shape:
        kw["shape"] = tuple(tc.shape)
    topo = T.make(tc.name, n, weights=tc.weights or None, **kw)
    schedule = None
    if tc.schedule:
        makers = {"one_peer_exponential": lambda: T.one_peer_exponential(n),
                  "random_matching": lambda: T.random_matching(n, seed=tc.seed)}
        if tc.schedule not in makers:
            raise T.TopologyError(f"unknown schedule {tc.schedule!r}; choose one of {', '.join(makers)}")
        schedule = makers[tc.schedule]()
    return topo, schedule


class _ScheduledComm:
    """GraphComm facade whose mix uses the schedule's topology of the current step."""

    def __init__(self, base, scheduled):
        self._base, self._sched, self.k = base, scheduled, 0

    def mix(self, x, out=None):
        return self._sched.mix(x, self.k, out=out)

    def start_mix(self, x, out=None):
        return self._sched.at(self.k).start_mix(x, out=out)

    def __getattr__(self, name):
        return getattr(self._base, name)

    @property
    def bytes_sent(self):
        return self._base.bytes_sent + self._sched.bytes_sent


class _Evaluator:
    """Collective metrics on its own communicator: average model, per-agent spread, consensus."""

    def __init__(self, mc, cfg, shard, xbuf, oracle_eval, oracle, algo, state_ref):
        self.mc, self.shard, self.oracle, self.oracle_eval = mc, shard, oracle, oracle_eval
        self.xbuf, self.algo, self.state_ref = xbuf, algo, state_ref
        n_ev = cfg.data.eval_samples or len(shard.y_test)
        self.xte_agent, self.yte_agent = shard.x_test[:n_ev], shard.y_test[:n_ev]
        r, s = mc.rank, mc.size
        self.xte_slice, self.yte_slice = shard.x_test[r::s], shard.y_test[r::s]
        n_tr = min(len(shard.y), cfg.data.eval_samples or len(shard.y))
        self.xtr, self.ytr = shard.x[:n_tr], shard.y[:n_tr]

    def __call__(self, x) -> dict:
        mc = self.mc
        xbar = mc.allreduce(x, op="mean")
        cons = math.sqrt(mc.allreduce(float(np.sum((x.astype(np.float64) - xbar) ** 2)), op="mean"))
        # average model: test set split across ranks; train accuracy on each agent's shard
        self.xbuf[...] = xbar
        tl, ta = self.oracle_eval.evaluate(self.xbuf, self.xte_slice, self.yte_slice)
        rl, ra = self.oracle_eval.evaluate(self.xbuf, self.xtr, self.ytr)
        nt, nr = len(self.yte_slice), len(self.ytr)
        sums = mc.allreduce(np.array([tl * nt, ta * nt, nt, rl * nr, ra * nr, nr], dtype=np.float64))
        # each agent's own model on the same test subset
        _, acc_i = self.oracle.evaluate(x, self.xte_agent, self.yte_agent)
        per = np.zeros(mc.size)
        per[mc.rank] = acc_i
        per = mc.allreduce(per)
        out = {"test_loss": sums[0] / sums[2], "test_acc": sums[1] / sums[2],
               "train_loss_avg_model": sums[3] / sums[5], "train_acc_avg_model": sums[4] / sums[5],
               "agent_acc_mean": float(per.mean()), "agent_acc_min": float(per.min()),
               "agent_acc_max": float(per.max()), "consensus_error": cons}
        out["generalization_gap"] = out["train_acc_avg_model"] - out["test_acc"]
        social = getattr(self.algo, "social_metrics", None)
        if social is not None:  # NEXT: objective, stationarity, tracking error of the social problem
            extra = social(self.state_ref(), self.oracle, mc)
            extra.pop("consensus_error", None)
            out.update(extra)
        return out, per


def train(cfg: C.Config, world, *, max_steps=None) -> dict:
    """Collective. Run one training job described by ``cfg``; return the final metrics (every rank).

    ``max_steps`` stops early after that many steps of this invocation
    (tests use it to simulate an interrupted run).
    """
    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(max(1, cfg.run.threads))
    topo, schedule = build_topology(cfg.topology, size)
    gc = GraphComm(world, topo)
    mc = GraphComm(world, topo)  # metrics / control traffic, kept off the algorithm's counters
    comm = gc if schedule is None else _ScheduledComm(gc, ScheduledGraphComm(world, schedule))
    try:
        return _train(cfg, gc, mc, comm, topo, rank, size, max_steps)
    finally:
        if comm is not gc:
            comm._sched.close()
        mc.close()
        gc.close()


def _train(cfg, gc, mc, comm, topo, rank, size, max_steps):
    d, r = cfg.data, cfg.run
    shard = load_agent_data(d.dataset, d.data_dir or None, d.partition, d.alpha, d.seed,
                            rank=rank, world_size=size, shards=d.shards or None, comm=mc)
    full_batch = r.batch_size == 0
    batch = int(mc.allreduce(len(shard.y), op="min")) if full_batch else r.batch_size
    spe = int(mc.allreduce(len(shard.y) // batch, op="min"))
    if spe < 1:
        smallest = int(mc.allreduce(len(shard.y), op="min"))
        raise MpidlError(f"the smallest shard has {smallest} samples, fewer than batch_size "
                         f"{r.batch_size}: lower [run] batch_size or use fewer agents")
    total = r.steps if r.steps > 0 else max(1, int(math.ceil(r.epochs * spe)))
    eval_every = r.eval_every or spe
    ckpt_every = r.checkpoint_every or max(spe, 100)
    dtype = torch.float64 if cfg.model.dtype == "float64" else torch.float32

    def new_model():
        return FlatModel(build_model(cfg.model.name, shard.input_shape, shard.num_classes,
                                     cfg.model.hidden, seed=r.seed), dtype)

    if cfg.model.name in CONVEX_MODELS:
        from mpidl.oracles import ConvexOracle
        kind = CONVEX_MODELS[cfg.model.name]
        oracle = ConvexOracle(shard.x, shard.y, kind, batch_size=0 if full_batch else batch, steps_per_epoch=spe,
                              seed=r.seed, rank=rank)
        x0, oracle_eval, xbuf, fm = np.zeros(oracle.dim), oracle, np.zeros(oracle.dim), None
        dim = oracle.dim
    else:
        fm, fm_eval = new_model(), new_model()
        oracle = TorchOracle(fm, shard.x, shard.y, batch_size=batch, steps_per_epoch=spe,
                             seed=r.seed, rank=rank, num_classes=shard.num_classes, loss=cfg.model.loss)
        oracle_eval = TorchOracle(fm_eval, shard.x[:1], shard.y[:1], batch_size=1, steps_per_epoch=1,
                                  num_classes=shard.num_classes, loss=cfg.model.loss)
        x0, xbuf, dim = fm.x, fm_eval.x, fm.dim
    _, factory = C.algorithm_registry()[cfg.algorithm.name]
    algo = factory(cfg.algorithm, steps_per_epoch=spe, num_samples=len(shard.y))
    state = algo.init(x0, comm)

    out = Path(r.out) / cfg.run_name
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    mc.barrier()
    store = CheckpointStore(out / "checkpoints", mc, keep=r.keep)
    expect = {"algorithm": cfg.algorithm.name, "topology": topology_digest(topo)}
    start = 0
    if r.resume != "no":
        step = store.latest() if r.resume == "auto" else int(r.resume)
        if step is not None:
            like = {"algo": state_to_dict(state), "buffers": fm.buffers() if fm is not None else {},
                    "rng": rng_state()}
            saved, _ = store.load(step, like=like, expect=expect)
            state = state_from_dict(algo.state_cls, saved["algo"], like=state)
            if fm is not None:
                fm.load_buffers(saved.get("buffers", {}))
            set_rng_state(saved["rng"])
            start = int(step)
            log.info("resumed from %s at step %d", store.root, start)
        else:
            log.info("no checkpoint in %s: starting from step 0", store.root)
    if start >= total:
        log.info("nothing to do: checkpoint step %d >= %d steps", start, total)

    cfg_dict = C.to_dict(cfg)
    rec = Recorder(out / "results.h5", mc, cfg_dict, resume=start if start > 0 else None)
    evaluator = _Evaluator(mc, cfg, shard, xbuf, oracle_eval, oracle, algo, lambda: state)
    if rank == 0:
        log.info("%s on %s: %d agents, %d params, %d steps/epoch, %d steps, out %s",
                 cfg.algorithm.name, topo.name, size, dim, spe, total, out)

    meta = {"config": cfg_dict, "world_size": size, **expect}
    bad_step = -1
    win_loss, win_acc, win_n = 0.0, 0.0, 0
    t0 = time.perf_counter()
    last = {}
    progress = Progress(total, mc, every=r.log_every, start=start)

    def check_finite():
        first, agent = mc.argmin(bad_step if bad_step >= 0 else total + 1)
        if first <= total:
            newest = store.latest()
            raise DivergenceError(
                f"loss became NaN/inf at step {int(first)} on agent {agent} "
                f"({cfg.algorithm.name}, lr={getattr(cfg.algorithm, 'lr', '?')}); lower the learning rate. "
                + (f"Last good checkpoint: step {newest} in {store.root}" if newest is not None
                   else "No checkpoint was written."))

    def save(step):
        check_finite()
        store.save(step, {"algo": state_to_dict(state), "buffers": fm.buffers() if fm is not None else {}, "rng": rng_state()},
                   dict(meta, step=step))

    stop_reason = "done"
    with PreemptionGuard(mc) as guard:
        k = start
        while k < total:
            if comm is not gc:
                comm.k = k
            state, m = algo.step(k, state, oracle, comm)
            loss = m["loss"]
            if bad_step < 0 and not math.isfinite(loss):
                bad_step = k
            win_loss += loss
            win_acc += oracle.last_correct
            win_n += 1
            k += 1
            progress.update(k, loss=loss)
            row_due = k % r.log_every == 0 or k == total
            if row_due:
                check_finite()
                tot = mc.allreduce(np.array([win_loss, win_acc, win_n, comm.bytes_sent], np.float64))
                row = dict(train_loss=tot[0] / tot[2], train_acc=tot[1] / tot[2],
                           bytes_sent=float(tot[3]), wall=rec.elapsed(), epoch=k / spe)
                last.update(row)
                rec.log("train", k, **row)
                win_loss, win_acc, win_n = 0.0, 0.0, 0
            if k % eval_every == 0 or k == total:
                check_finite()
                ev, per = evaluator(state.x)
                last.update(ev)
                rec.log("eval", k, epoch=k / spe, wall=rec.elapsed(),
                        bytes_sent=float(mc.allreduce(float(comm.bytes_sent))), **ev,
                        **{f"agent{i:03d}_test_acc": float(v) for i, v in enumerate(per)})
                if rank == 0:
                    log.info("step %d (epoch %.2f): test acc %.4f (agents %.4f..%.4f), train loss %.4f, "
                             "consensus %.3e", k, k / spe, ev["test_acc"], ev["agent_acc_min"],
                             ev["agent_acc_max"], last.get("train_loss", float("nan")), ev["consensus_error"])
            if k % ckpt_every == 0 or k == total:
                save(k)
            if max_steps is not None and k - start >= max_steps:
                stop_reason = "max_steps"
                break
            if guard.should_stop():
                if k % ckpt_every and k != total:
                    save(k)
                stop_reason = "preempted"
                log.info("stop signal received: saved step %d in %s; resume with --set run.resume=auto",
                         k, store.root)
                break
    progress.close()
    rec.close()
    last.update(step=k, steps=total, steps_per_epoch=spe, stop=stop_reason, out=str(out),
                time=time.perf_counter() - t0)
    return last
