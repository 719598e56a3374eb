"""Training driver: config -> layout session -> the one training loop.

``train(cfg, world)`` is Collective over ``world`` (an mpi4py communicator).
The algorithm's registered layout (:mod:`mpidl.layouts`) maps ranks to roles
and builds a session (communicators, data, model, algorithm, state, how to
evaluate); this module owns the loop that every family shares: steps, the
log / eval / checkpoint cadence, exact resume, preemption, divergence checks
and the results file.  Every rank runs the same number of steps (the session
agrees the steps per epoch).  Per step the algorithm makes its own
collectives; the driver adds, at most once per step, the preemption check
and, at the log / eval / checkpoint cadence, metric reductions on the
session's control communicator so the algorithm's byte counters stay exact.

An algorithm that holds state outside ``session.state`` (the RMA windows of
asynchronous LSGD / EASGD) defines ``prepare_checkpoint(state, mc)``
(Collective over ``mc``): the driver calls it right before every save, and it
returns the state with those contents copied in.

Non-finite losses are noted locally at every step and agreed at each log,
eval and checkpoint boundary (before any save), so a diverging run stops with
one message naming the first bad step and rank, and the newest checkpoint is
one taken before it.  A training batch that could not be used (the oracle's
``data_error``: NaN/inf found by ``[data] check = "batch"``, or a reader
that failed) is noted and agreed the same way, in the same reduction, and
stops the run with that batch's message (:class:`DataStepError`).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from mpidl import config as C
from mpidl.algorithms.base import state_from_dict, state_to_dict
from mpidl.checkpoint import CheckpointStore, PreemptionGuard, rng_state, set_rng_state
from mpidl.device import resolve_cuda_aware, resolve_device
from mpidl.errors import MpidlError
from mpidl.layouts import CONVEX_MODELS, build_topology, setup_for
from mpidl.metrics import Progress, Recorder

log = logging.getLogger("mpidl.driver")

PROVENANCE = ("model_factory", "data_file", "data_bytes", "data_sha256_head")
"""Keys of a session's ``expect`` that the results file records as root attributes as well."""

__all__ = ["train", "headline", "build_topology", "DivergenceError", "DataStepError", "CONVEX_MODELS"]


class DivergenceError(MpidlError):
    """The loss became NaN or infinite."""


class DataStepError(MpidlError):
    """A training batch could not be used (bad values or a failed read), agreed over all ranks."""


def headline(ev: dict) -> str:
    """Local. ``test acc 0.9123``, or ``test mse 0.0421`` for regression (where accuracy is undefined)."""
    if "test_mse" in ev and not math.isfinite(ev.get("test_acc", float("nan"))):
        return f"test mse {ev['test_mse']:.4g}"
    return f"test acc {ev['test_acc']:.4f}"


def train(cfg: C.Config, world, *, max_steps=None, should_stop=None) -> dict:
    """Collective. Run one training job described by ``cfg``; return the final metrics (every rank).

    The family's layout (:mod:`mpidl.layouts`) builds the session: its
    communicators, data, models, algorithm and state.  ``max_steps`` stops
    early after that many steps of this invocation (tests use it to simulate
    an interrupted run).

    ``should_stop(k, row)`` (Local, optional; used by ``mpidl compare`` for
    wall-time and byte budgets) is asked after every ``train`` row, with the
    row just logged (``train_loss``, ``bytes_sent`` of all ranks, ``wall``,
    ``epoch``).  The ranks' answers are combined by one scalar max-reduction,
    so the run stops on every rank at the same step once any rank says True:
    it evaluates and checkpoints that step (unless it just did) and returns
    with ``stop = "budget"``.  Without the hook the loop makes no extra call.
    """
    if cfg.model.name in CONVEX_MODELS and cfg.run.device == "cpu":   # NumPy + Numba only: no torch
        session = setup_for(cfg)(cfg, world)
    else:
        import torch
        torch.set_num_threads(max(1, cfg.run.threads))
        device = resolve_device(cfg, world)   # once per rank; "cpu" makes no call at all
        aware = resolve_cuda_aware(cfg, world, device)   # a CPU run: False, no call
        setup = setup_for(cfg)
        session = (setup(cfg, world) if device.type == "cpu" and not aware
                   else setup(cfg, world, device=device, cuda_aware=aware))
    try:
        return _loop(cfg, session, max_steps, should_stop)
    finally:
        session.close()


def _resume(cfg, session, store, counters):
    """Collective. Load the checkpoint asked for by ``run.resume``; return ``(start step, event)``.

    A checkpoint of another world size goes to :func:`mpidl.resize.resume_resized` (the
    layout's transform, with ``run.resize``); its ``event`` (else None) goes to the results file.

    ``counters`` (the driver's own per-rank state: the byte offset and the
    open training-metric window) is filled in place from the checkpoint.
    """
    r = cfg.run
    if r.resume == "no":
        return 0, None
    step = store.latest() if r.resume == "auto" else int(r.resume)
    if step is None:
        log.info("no checkpoint in %s: starting from step 0", store.root)
        return 0, None
    man = store.manifest(step)
    if man.get("world_size") != session.mc.size:   # another number of ranks: the layout's transform
        from mpidl.resize import resume_resized
        return resume_resized(cfg, session, store, step, man, counters)
    # "rng": None accepts the saved RNG tree whatever devices wrote it (a GPU run adds CUDA
    # states); set_rng_state checks and restores it (CUDA states ignored with a warning on a CPU)
    like = {"algo": state_to_dict(session.state), "buffers": session.extra_state(), "rng": None,
            "driver": counters}
    saved, _ = store.load(step, like=like, expect=session.expect, in_place=True)   # no second state copy
    session.state = state_from_dict(session.algo.state_cls, saved["algo"], like=session.state)
    session.load_extra_state(saved.get("buffers", {}))
    set_rng_state(saved["rng"])
    for key, buf in counters.items():
        buf[...] = saved["driver"][key]
    log.info("resumed from %s at step %d", store.root, step)
    return int(step), None


def _loop(cfg, session, max_steps, should_stop=None):
    r, mc, algo = cfg.run, session.mc, session.algo
    rank, spe = mc.rank, session.steps_per_epoch
    total = r.steps if r.steps > 0 else max(1, int(math.ceil(r.epochs * spe)))
    eval_every = r.eval_every or spe
    ckpt_every = r.checkpoint_every or max(spe, 100)

    out = Path(r.out) / cfg.run_name
    err = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            err = f"[run] out {r.out!r}: cannot create {str(out)!r}: {e.strerror or e}"
    try:
        mc.agree(err)     # one message on every rank instead of a traceback from each
    except MpidlError as e:
        raise C.ConfigError(str(e)) from None
    store = CheckpointStore(out / "checkpoints", mc, keep=r.keep)
    # the driver's own checkpointed counters: bytes sent before this invocation (the
    # algorithm's counters start at 0 in every process) and the open training window
    # (loss sum, #losses, accuracy sum, #accuracies), so a resumed run's rows equal a straight run's
    counters = {"bytes_before": np.zeros(1), "window": np.zeros(4)}
    start, event = _resume(cfg, session, store, counters)
    win = counters["window"]

    def bytes_sent():
        return float(counters["bytes_before"][0]) + session.bytes_sent()
    if start >= total:
        log.info("nothing to do: checkpoint step %d >= %d steps", start, total)

    cfg_dict = C.to_dict(cfg)
    prov = {k: session.expect[k] for k in PROVENANCE if k in session.expect}   # the user's model / data file
    rec = Recorder(out / "results.h5", mc, cfg_dict, resume=start if start > 0 else None, **prov)
    if event is not None:
        rec.event(**event)
    if rank == 0:
        log.info("%s, %d steps, out %s", session.describe(), total, out)

    meta = {"config": cfg_dict, "world_size": mc.size, **session.expect}
    bad_step = -1
    t0 = time.perf_counter()
    last = {}
    evaluated = False
    progress = Progress(total, mc, every=r.log_every, start=start)

    data_step, data_msg = -1, ""
    oracle = getattr(session, "oracle", None)

    def check_finite():
        first, agent = mc.argmin(data_step if data_step >= 0 else total + 1)
        if first <= total:                 # a batch that could not be used: its message, on every rank
            msg = mc.bcast(data_msg if rank == agent else None, root=int(agent))
            newest = store.latest()
            raise DataStepError(msg + ". " + (f"Last good checkpoint: step {newest} in {store.root}" if newest
                                              is not None else "No checkpoint was written."))
        first, agent = mc.argmin(bad_step if bad_step >= 0 else total + 1)
        if first <= total:
            newest = store.latest()
            raise DivergenceError(
                f"loss became NaN/inf at step {int(first)} on rank {agent} "
                f"({cfg.algorithm.name}, lr={getattr(cfg.algorithm, 'lr', '?')}); lower the learning rate. "
                + (f"Last good checkpoint: step {newest} in {store.root}" if newest is not None
                   else "No checkpoint was written."))

    def save(step):
        check_finite()
        prepare = getattr(algo, "prepare_checkpoint", None)
        if prepare is not None:     # Collective: state held outside session.state (async LSGD's RMA windows)
            session.state = prepare(session.state, mc)
        rec.sync(step)  # results up to this step are durable before the checkpoint exists
        driver = {"bytes_before": np.array([bytes_sent()]), "window": win.copy()}
        store.save(step, {"algo": state_to_dict(session.state), "buffers": session.extra_state(),
                          "rng": rng_state(), "driver": driver}, dict(meta, step=step))

    stop_reason = "done"
    k = start
    with PreemptionGuard(mc) as guard:
        while k < total:
            budget_spent = False
            session.before_step(k)
            session.state, m = algo.step(k, session.state, session.oracle, session.comm)
            loss, acc = m.get("loss"), m.get("acc")
            if data_step < 0 and getattr(oracle, "data_error", None) is not None:
                data_step, data_msg = oracle.data_error
            if acc is None and loss is not None:
                acc = getattr(session.oracle, "last_correct", None)
            if loss is not None:
                if bad_step < 0 and not math.isfinite(loss):
                    bad_step = k
                win[0] += loss
                win[1] += 1
            if acc is not None:
                win[2] += acc
                win[3] += 1
            k += 1
            # ranks without a loss of their own (rank 0 of pdADMM, a first pipeline stage) show
            # the last agreed training loss
            progress.update(k, loss=loss if loss is not None else last.get("train_loss", float("nan")))
            if k % r.log_every == 0 or k == total:
                check_finite()
                tot = mc.allreduce(np.append(win, bytes_sent()))
                row = dict(train_loss=tot[0] / tot[1] if tot[1] else float("nan"),
                           train_acc=tot[2] / tot[3] if tot[3] else float("nan"),
                           bytes_sent=float(tot[4]), wall=rec.elapsed(), epoch=k / spe)
                last.update(row)
                rec.log("train", k, **row)
                win[:] = 0.0
                if should_stop is not None:  # one agreed answer: every rank stops at the same step
                    budget_spent = mc.allreduce(1.0 if should_stop(k, dict(row)) else 0.0, op="max") > 0
            if k % eval_every == 0 or k == total or budget_spent:
                check_finite()
                ev, per = session.evaluate(session.state)
                evaluated = True
                last.update(ev)
                extra = {} if per is None else {f"agent{i:03d}_test_acc": float(v) for i, v in enumerate(per)}
                rec.log("eval", k, epoch=k / spe, wall=rec.elapsed(),
                        bytes_sent=float(mc.allreduce(bytes_sent())), **ev, **extra)
                if rank == 0:
                    more = session.summary(ev)
                    log.info("step %d (epoch %.2f): %s, train loss %.4f%s", k, k / spe, headline(ev),
                             last.get("train_loss", float("nan")), f", {more}" if more else "")
            if k % ckpt_every == 0 or k == total or budget_spent:
                save(k)
            if budget_spent:
                stop_reason = "budget"
                break
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
                time=time.perf_counter() - t0, evaluated=evaluated,
                summary=session.summary(last) if evaluated else "")
    return last
