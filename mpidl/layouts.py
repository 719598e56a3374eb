"""Rank layouts: how a family maps MPI ranks to its roles, for the one training loop.

The driver (:mod:`mpidl.driver`) owns the loop: steps, logging, evaluation
cadence, checkpoints, preemption, divergence checks and the results file.
What differs between families is *who a rank is* (an agent with a whole
model; a layer of a layer-parallel net; a stage of a pipeline replica; a
worker in a group), which communicators it needs, what its state is and how
the job evaluates.  A family declares that with a **layout**: a setup
function registered with its algorithm,

    register_algorithm(name, ConfigCls, factory, layout=setup_fn)

``setup_fn(cfg, world) -> Session`` is Collective over ``world``.  It builds
the family's communicators (through :mod:`mpidl.comm`), loads the data,
builds the model(s), the algorithm (``factory``) and the initial state, and
returns a :class:`Session`.  ``layout=None`` selects :func:`setup_agents`,
the layout of the consensus families (NEXT, CDSGD, FedAvg, LSGD, EASGD): one
rank = one agent holding a whole flat model, evaluated as the average model.

Contract between the driver and a session
-----------------------------------------
* ``algo.step(k, session.state, session.oracle, session.comm)`` returns
  ``(state, metrics)``; ``metrics["loss"]`` is this rank's training loss of
  step k or ``None`` when the rank has none (a non-last pipeline stage or
  pdADMM layer); ``metrics.get("acc")`` the batch accuracy or ``None``.
  The driver averages both over the ranks that report them.
* ``session.state`` is a dataclass of NumPy arrays and Python scalars
  (checkpointed generically); ``extra_state()`` adds arrays that live outside
  it (BatchNorm buffers, for instance).
* ``session.evaluate(state)`` is Collective over ``session.mc`` and returns
  the same ``(dict of floats, per-agent accuracies or None)`` on every rank;
  the dict holds at least ``test_loss`` and ``test_acc``.
* ``session.mc`` is a :class:`~mpidl.comm.GraphComm` over all ranks that
  carries only the driver's control traffic, so the algorithm's byte counter
  (``bytes_sent()``) stays exact.
"""
from __future__ import annotations

import math

import numpy as np

from mpidl import config as C
from mpidl import topology as T
from mpidl import xp
from mpidl.errors import MpidlError

__all__ = ["Session", "AgentSession", "setup_agents", "build_topology", "setup_for", "CONVEX_MODELS",
           "steps_per_epoch", "agreed", "load_shard", "batch_options", "user_model", "provenance"]

CONVEX_MODELS = {"convex-logistic": "logistic", "convex-lsq": "lsq"}
"""Model names served by the Numba convex oracles instead of a torch model."""


class Session:
    """What the driver needs from a family for one run (see the module docstring).

    Subclasses set the attributes in ``__init__`` and override the hooks they
    need; the defaults suit a family without extra state or summary text.
    """

    mc = None
    algo = None
    state = None
    comm = None
    oracle = None
    steps_per_epoch: int = 1
    expect: dict = {}
    size_keys: tuple = ()
    """Keys of ``expect`` that depend on the number of ranks (a resize does not check them)."""
    resizable: bool = True
    """False: :meth:`resize` always raises, so a size mismatch reports that, whatever ``[run] resize`` says."""

    def describe(self) -> str:
        """Local. One line for the start-of-run log."""
        return f"{self.algo.name}: {self.mc.size} ranks, {self.steps_per_epoch} steps/epoch"

    def before_step(self, k: int) -> None:
        """Local. Called before ``algo.step(k, ...)``."""

    def extra_state(self) -> dict:
        """Local. Arrays to checkpoint beside the algorithm state."""
        return {}

    def load_extra_state(self, d: dict) -> None:
        """Local. Restore what :meth:`extra_state` saved."""

    def bytes_sent(self) -> float:
        """Local. Bytes this rank's algorithm handed to MPI so far."""
        return float(getattr(self.comm, "bytes_sent", 0))

    def evaluate(self, state):
        """Collective. ``(metrics dict, per-agent test accuracies or None)``, equal on every rank."""
        raise NotImplementedError

    def summary(self, ev: dict) -> str:
        """Local. Family-specific text for the evaluation log line."""
        return ""

    def resize(self, old, like: dict, comm):
        """Collective over ``comm`` (mpi4py, every rank). This rank's ``{"algo", "buffers"}`` tree made
        from ``old`` (:class:`mpidl.resize.OldRanks`, a checkpoint of another number of ranks) and
        the text the log shows; ``like`` is this rank's fresh tree.  A family that cannot resize
        raises :class:`mpidl.resize.ResizeError` (the default)."""
        from mpidl.resize import ResizeError
        raise ResizeError(f"{self.algo.name} cannot resume a checkpoint of {old.n} ranks on {self.mc.size}; "
                          f"resume with mpiexec -n {old.n}")

    def close(self) -> None:
        """Collective. Free the family's communicators."""


def setup_for(cfg: C.Config):
    """Local. The layout setup function registered for ``cfg.algorithm.name``."""
    setup = C.algorithm_layout(cfg.algorithm.name)
    return setup_agents if setup is None else setup


def steps_per_epoch(mc, n_local: int, batch_size: int) -> tuple:
    """Collective. ``(batch, steps per epoch)`` over local sample counts: the minimum over ranks.

    ``batch_size = 0`` means full batch (the smallest shard).  Raises on every
    rank when the smallest shard is smaller than one batch.
    """
    smallest = int(mc.allreduce(int(n_local), op="min"))
    batch = smallest if batch_size == 0 else int(batch_size)
    spe = smallest // batch if batch > 0 else 0
    if spe < 1:
        raise MpidlError(f"the smallest shard has {smallest} samples, fewer than batch_size "
                         f"{batch_size}: lower [run] batch_size or use fewer ranks")
    return batch, spe


def check_convex_data(cfg: C.Config, mc, num_classes: int) -> None:
    """Collective. Raise :class:`~mpidl.config.ConfigError` on every rank when the convex model
    ``cfg.model.name`` cannot fit the dataset's labels.

    ``convex-logistic`` needs two classes (labels 0/1); ``convex-lsq`` needs
    real-valued targets (``num_classes == 0``).  The class count is agreed over
    ``mc`` (its maximum), so every rank raises the same error before step 0
    and before anything is written under ``run.out``.
    """
    k = int(mc.allreduce(int(num_classes), op="max"))
    name, src = cfg.model.name, cfg.data.shards or cfg.data.path or cfg.data.dataset
    kind = "a regression set (real-valued targets)" if k == 0 else f"a classification set with {k} classes"
    if name == "convex-logistic" and k != 2:
        raise C.ConfigError(
            f'[model] name = "convex-logistic" needs a dataset with 2 classes (labels 0/1), but {src!r} is '
            f'{kind}: use ' + ('model.name = "convex-lsq"' if k == 0 else
                               'model.name = "linear" (softmax regression) or another torch model'))
    if name == "convex-lsq" and k != 0:
        raise C.ConfigError(
            f'[model] name = "convex-lsq" fits real-valued targets, but {src!r} is {kind}: use '
            + ('model.name = "convex-logistic"' if k == 2 else 'model.name = "linear" (softmax regression)')
            + ' or a regression set (synthetic-lsq)')


def agreed(mc, fn, *args, **kwargs):
    """Collective over ``mc``. Call ``fn``; a :class:`MpidlError` (or ValueError) on any rank is
    raised on every rank, as the lowest failing rank's message."""
    from mpidl.comm import CollectiveError
    err, out = None, None
    try:
        out = fn(*args, **kwargs)
    except (MpidlError, ValueError) as e:
        err = e
    try:
        mc.agree(None if err is None else str(err))
    except CollectiveError as e:
        raise MpidlError(str(e)) from None
    return out


def load_shard(cfg: C.Config, mc, rank: int, size: int, batch_checks: bool = False):
    """Collective over ``mc``. Agent ``rank`` of ``size``'s data from ``cfg.data`` (built-in set,
    ``[data] path`` file, or shard file); one error on every rank when any rank fails.

    ``batch_checks``: the caller checks each training batch as it is read (a
    :class:`mpidl.oracles.TorchOracle`), so ``[data] check = "batch"`` (and
    ``"auto"`` on lazy inputs) skips the start-up scan; other callers get the
    full scan unless ``check = "off"``.
    """
    from mpidl.data import load_agent_data
    d = cfg.data
    check = d.check if batch_checks or d.check == "off" else "full"
    return load_agent_data(d.dataset, d.data_dir or None, d.partition, d.alpha, d.seed, rank=rank,
                           world_size=size, shards=d.shards or None, comm=mc, path=d.path or None, check=check)


def batch_options(cfg: C.Config, shard) -> dict:
    """Local. The keyword arguments of :class:`mpidl.oracles.TorchOracle` that ``[data]`` sets."""
    from mpidl.sources import _mib_rows
    d = cfg.data
    return dict(shuffle=d.shuffle, block=shard.block_rows or _mib_rows(tuple(shard.x.shape)),
                buffer=d.shuffle_buffer, prefetch=d.prefetch, check=shard.attrs.get("check") == "batch",
                where=d.path or shard.attrs.get("source", ""), file_rows=shard.indices)


def user_model(cfg: C.Config, shard, mc, dtype):
    """Collective over ``mc``. The model ``cfg.model`` describes (built-in or the user's factory),
    seeded with ``run.seed``, checked on two training rows to give one score per class (or one
    prediction per sample for regression) before step 0; one error on every rank otherwise."""
    def build():
        from mpidl.models import check_output, make_model
        from mpidl.oracles import as_batch
        model = make_model(cfg.model, shard.input_shape, shard.num_classes, seed=cfg.run.seed).to(dtype)
        if cfg.model.factory:
            what = f"the model of factory {cfg.model.factory!r}"
            check_output(model, as_batch(shard.x[:2], dtype), shard.num_classes, what)
        return model
    return agreed(mc, build)


def provenance(cfg: C.Config) -> dict:
    """Local. What a checkpoint must match beyond the algorithm: the model factory spec and the
    data file's path, size and head hash (empty for built-in models and data sets)."""
    out = {}
    if cfg.model.factory:
        out["model_factory"] = cfg.model.factory
    if cfg.data.path:
        from mpidl.sources import fingerprint
        out.update({k: (str(v) if k == "data_bytes" else v) for k, v in fingerprint(cfg.data.path).items()})
    return out


# -- the agent layout ---------------------------------------------------------

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


class AgentSession(Session):
    """One rank = one agent with a whole flat model; evaluation of the average model.

    Evaluation (Collective): the average model ``x_bar`` on the test set
    (split over the ranks) and on each agent's training shard, every agent's
    own model on a common test subset (``agent_acc_min/mean/max``), the
    consensus error ``sqrt(mean_i ||x_i - x_bar||^2)``, and whatever the
    algorithm adds through ``algo.eval_metrics(state, session)`` (or NEXT's
    ``social_metrics``).
    """

    def __init__(self, cfg: C.Config, world, device=None, cuda_aware=False):
        rank, size = world.Get_rank(), world.Get_size()
        self.device = device
        self.cuda_aware = bool(cuda_aware)
        topo, schedule = build_topology(cfg.topology, size)
        self.topology = topo
        self.gc = self.mc = self._sched = None
        try:
            self._build(cfg, world, topo, schedule, rank, size)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg, world, topo, schedule, rank, size):
        from mpidl.comm import GraphComm, ScheduledGraphComm

        cc = cfg.comm
        self.gc = GraphComm(world, topo, cuda_aware=self.cuda_aware, progress=cc.progress, bucket_mb=cc.bucket_mb)
        self.mc = GraphComm(world, topo)  # control traffic (host arrays), kept off the algorithm's counters
        self._sched = None if schedule is None else ScheduledGraphComm(world, schedule, cuda_aware=self.cuda_aware,
                                                                       overlap=self.gc.overlap)
        self.comm = self.gc if schedule is None else _ScheduledComm(self.gc, self._sched)
        d, r = cfg.data, cfg.run
        # per-batch checks where the loss comes from TorchOracle.loss_grad (NEXT's Gauss-Newton surrogate
        # and the convex oracles read their batches elsewhere: they get the start-up scan)
        shard = load_shard(cfg, self.mc, rank, size,
                           batch_checks=cfg.model.name not in CONVEX_MODELS and cfg.algorithm.name != "next")
        self.regression = shard.num_classes == 0
        self.target_width = 1 if np.ndim(shard.y) == 1 else int(np.shape(shard.y)[1])
        batch, spe = steps_per_epoch(self.mc, len(shard.y), r.batch_size)
        full_batch = r.batch_size == 0
        self.steps_per_epoch = spe
        if cfg.model.name in CONVEX_MODELS:  # NumPy + Numba only: a convex run never imports torch
            from mpidl.convex import ConvexOracle
            check_convex_data(cfg, self.mc, shard.num_classes)
            opts = batch_options(cfg, shard)
            self.oracle = ConvexOracle(shard.x, shard.y, CONVEX_MODELS[cfg.model.name],
                                       batch_size=0 if full_batch else batch, steps_per_epoch=spe,
                                       seed=r.seed, rank=rank, shuffle=opts["shuffle"], block=opts["block"],
                                       buffer=opts["buffer"])
            self.oracle_eval, self.fm = self.oracle, None
            x0, self.xbuf, self.dim = np.zeros(self.oracle.dim), np.zeros(self.oracle.dim), self.oracle.dim
        else:
            import torch

            from mpidl.flat import FlatModel
            from mpidl.oracles import TorchOracle
            dtype = torch.float64 if cfg.model.dtype == "float64" else torch.float32

            self.fm, fm_eval = (FlatModel(user_model(cfg, shard, self.mc, dtype), dtype, device=self.device)
                                 for _ in range(2))
            self.oracle = TorchOracle(self.fm, shard.x, shard.y, batch_size=batch, steps_per_epoch=spe,
                                      seed=r.seed, rank=rank, num_classes=shard.num_classes,
                                      loss=cfg.model.loss, augment=d.augment, **batch_options(cfg, shard))
            self.oracle_eval = TorchOracle(fm_eval, shard.x[:1], shard.y[:1], batch_size=1, steps_per_epoch=1,
                                           num_classes=shard.num_classes, loss=cfg.model.loss)
            x0, self.xbuf, self.dim = self.fm.x, fm_eval.x, self.fm.dim
            self.gc.attach(self.fm)     # progress and gradient buckets during backward ([comm])
        _, factory = C.algorithm_registry()[cfg.algorithm.name]
        self.algo = factory(cfg.algorithm, steps_per_epoch=spe, num_samples=len(shard.y))
        self.state = self.algo.init(x0, self.comm)
        from mpidl.checkpoint import topology_digest
        self.expect = {"algorithm": cfg.algorithm.name, "topology": topology_digest(topo), **provenance(cfg)}
        # evaluation data
        n_ev = d.eval_samples or len(shard.y_test)
        self.xte_agent, self.yte_agent = shard.x_test[:n_ev], shard.y_test[:n_ev]
        self.xte_slice, self.yte_slice = shard.x_test[rank::size], shard.y_test[rank::size]
        n_tr = min(len(shard.y), d.eval_samples or len(shard.y))
        self.xtr, self.ytr = shard.x[:n_tr], shard.y[:n_tr]

    size_keys = ("topology",)

    def resize(self, old, like, comm):
        """Collective. The average of the old agents (every floating-point array: x, momentum, NEXT's
        y and g, BatchNorm statistics), or the algorithm's own rule (``algo.resize_state``: LSGD's
        leader, EASGD's centre); see :mod:`mpidl.resize`."""
        from mpidl.resize import average, averaged_names
        own = getattr(self.algo, "resize_state", None)
        if own is not None:
            return own(old, like, comm)
        tree = average(old, like, list(range(old.n)), comm)
        text = (f"every agent starts from the average of the {old.n} agents' "
                f"{', '.join(averaged_names(like))}")
        note = getattr(self.algo, "resize_note", "")
        return tree, text + (f" ({note})" if note else "")

    def describe(self) -> str:
        return (f"{self.algo.name} on {self.topology.name}: {self.mc.size} agents, {self.dim} params, "
                f"{self.steps_per_epoch} steps/epoch")

    def before_step(self, k):
        if self._sched is not None:
            self.comm.k = k

    def extra_state(self):
        return self.fm.buffers() if self.fm is not None else {}

    def load_extra_state(self, d):
        if self.fm is not None:
            self.fm.load_buffers(d)

    def evaluate_model(self, x):
        """Collective. ``(test_loss, test_acc)`` of the flat parameters ``x`` (the same on every rank).

        The test set is split over the ranks; one allreduce combines the parts.
        """
        xp.assign(self.xbuf, x)
        tl, ta = self.oracle_eval.evaluate(self.xbuf, self.xte_slice, self.yte_slice)
        nt = len(self.yte_slice)
        s = self.mc.allreduce(np.array([tl * nt, ta * nt, nt], dtype=np.float64))
        return float(s[0] / s[2]), float(s[1] / s[2])

    def _average_buffers(self):
        """Collective. The evaluation model's floating buffers (BatchNorm running statistics) := the
        mean of the agents' own, so the average model is scored with averaged statistics (one
        allreduce; a model without such buffers makes no call)."""
        if self.fm is None:
            return
        own = [b for b in self.fm.model.buffers() if b.is_floating_point()]
        if not own:
            return
        flat = np.concatenate([b.detach().cpu().double().numpy().ravel() for b in own])
        mean = self.mc.allreduce(flat, op="mean")
        dst = [b for b in self.oracle_eval.fm.model.buffers() if b.is_floating_point()]
        import torch
        a = 0
        for b in dst:
            n = b.numel()
            b.copy_(torch.from_numpy(mean[a:a + n]).reshape(b.shape).to(b.dtype))
            a += n

    def evaluate(self, state):
        mc, x = self.mc, state.x
        xh = xp.to_numpy(x)              # host values (a copy only when the state is on a device)
        xbar = mc.allreduce(xh, op="mean")
        cons = math.sqrt(mc.allreduce(float(np.sum((xh.astype(np.float64) - xbar) ** 2)), op="mean"))
        # average model: test set split across ranks; train accuracy on each agent's shard
        xp.assign(self.xbuf, xbar)
        self._average_buffers()
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
        if self.regression:  # the losses are 1/2 the summed squared error per sample
            out["test_mse"] = 2.0 * out["test_loss"] / self.target_width
        hook = getattr(self.algo, "eval_metrics", None)
        if hook is not None:
            out.update(hook(state, self))
        social = getattr(self.algo, "social_metrics", None)
        if social is not None:  # NEXT: objective, stationarity, tracking error of the social problem
            extra = social(state, self.oracle, mc)
            extra.pop("consensus_error", None)
            out.update(extra)
        return out, per

    def summary(self, ev):
        if self.regression:
            return f"average model; consensus {ev['consensus_error']:.3e}"
        return (f"average model; agents {ev['agent_acc_min']:.4f}..{ev['agent_acc_max']:.4f}, "
                f"consensus {ev['consensus_error']:.3e}, gap {ev['generalization_gap']:.4f}")

    def close(self):
        oracle_close = getattr(getattr(self, "oracle", None), "close", None)
        if oracle_close is not None:  # the batch reader thread
            oracle_close()
        algo_close = getattr(getattr(self, "algo", None), "close", None)
        if algo_close is not None:  # algorithms with their own communicators / RMA windows (LSGD, EASGD)
            algo_close()
        for c in (self._sched, self.mc, self.gc):
            if c is not None:
                c.close()


def setup_agents(cfg: C.Config, world, device=None, cuda_aware=False) -> AgentSession:
    """Collective. The agent layout: one rank = one agent on ``cfg.topology``.

    ``device`` (a torch device, from :func:`mpidl.device.resolve_device`) holds the torch
    model, the batches and the algorithm's state (see :mod:`mpidl.flat`); ``cuda_aware``
    (:func:`mpidl.device.resolve_cuda_aware`) hands the algorithm's device buffers to MPI
    directly instead of staging them through host memory.
    """
    return AgentSession(cfg, world, device, cuda_aware)
