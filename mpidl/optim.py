"""Distributed optimizers for your own training loop (the algorithms' step without the driver).

Wrap a torch optimizer; keep your loop::

    opt = mpidl.optim.Consensus(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                topology="ring")
    for xb, yb in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step(loss=loss)          # the local update and this step's communication
    mpidl.average_parameters(model)  # the consensus average on every rank

Every wrapper is Collective at construction and in :meth:`step` (every rank of
``comm`` must construct it and call ``step`` the same number of times).  At
construction it flattens the optimizer's parameters into one contiguous
buffer (:class:`mpidl.flat.FlatModel`: the parameters become views of it, so
one collective moves the whole model), builds a
:class:`~mpidl.comm.GraphComm` on the topology, and checks with one collective
on a digest of the parameter shapes that every rank holds the same model: a
mismatch, or bad input on any rank, raises one ``ValueError``/``TypeError`` on
every rank.

**The update is the algorithm's own code.**  With ``torch.optim.SGD`` the
wrapper runs the driver's algorithm step (:mod:`mpidl.algorithms.cdsgd`,
:mod:`mpidl.algorithms.lsgd`) on the gradient your ``backward`` left, with the
SGD's ``lr`` (re-read every step, so torch LR schedulers work), ``momentum``,
``nesterov`` and ``weight_decay``; the SGD's own ``step`` is not called.  Fed
the same batches, the parameters equal the driver's run bit for bit (tests/mpi/
mpitest_optim.py).  With any other optimizer (Adam, ...) your optimizer makes
the local step and the wrapper adds the algorithm's communication:

=================  =====================================  ==============================================
wrapper            torch.optim.SGD                        other optimizers
=================  =====================================  ==============================================
``Consensus``      CDSGD (momentum 0) / CDMSGD: x_i <-    local step, then x_i <- sum_j W_ij x_j
                   sum_j W_ij x_j - lr g_i (+ momentum)   (adapt-then-combine), every ``comm_period``
``Centralized``    centralized SGD: g <- mean_i g_i       g <- mean_i g_i (one allreduce), local step
``FedAvg``         FedAvg: local SGD, every ``period``    local steps, every ``period`` steps the
                   steps the sample-weighted average      sample-weighted average
``LeaderSGD``      synchronous LSGD (pull toward leader)  local step replaces LSGD's SGD step
``EASGD``          synchronous EASGD (elastic centre)     local step replaces EASGD's SGD step
=================  =====================================  ==============================================

**GPUs.**  A model on a GPU stays there: the flat buffer is made on the parameters'
device, and so is the algorithm's state, so the update runs on the GPU; the
communication stages the buffer through pinned host memory, or hands it to MPI
directly when the MPI library is CUDA-aware (``cuda_aware="auto"``, the default:
when every rank's MPI says so; ``True`` forces it, ``False`` stages).  Give each rank
its own GPU (``torch.cuda.set_device(local_rank)``) before building the model.

BatchNorm running statistics stay each rank's own during training, as in the
driver (which checkpoints them per agent and never mixes them);
:func:`average_parameters` averages them together with the parameters, and
:func:`broadcast_parameters` copies them from the root.  :meth:`bytes_sent`
counts what this rank handed to MPI for the algorithm, as the driver's
``bytes_sent`` does (the construction check is not counted).

Checkpoints: ``state_dict()`` / ``load_state_dict()`` in torch's convention
(:mod:`mpidl.optim_state`): the wrapped optimizer's state plus what the wrapper
adds (the algorithm's state, the flat parameters, the step count, a shape
digest); loading the list of every rank's state saved by another number of
ranks, with ``resize="average"``, follows the rules of ``[run] resize``.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import torch

from mpidl.errors import MpidlError
from mpidl.optim_state import StateDictMixin

__all__ = ["Consensus", "Centralized", "FedAvg", "LeaderSGD", "EASGD",
           "broadcast_parameters", "average_parameters"]


# -- shared pieces -------------------------------------------------------------

class _GivenGradient:
    """Oracle of the wrapped loop: the gradient the user's backward left in the flat buffer."""

    def __init__(self, fm):
        self.fm, self.dim, self.loss = fm, fm.dim, float("nan")

    def loss_grad(self, x, k):
        return self.loss, self.fm.g


class _Params(torch.nn.Module):
    """A module that holds the optimizer's parameters (the same Parameter objects) for FlatModel."""

    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def _base_comm(comm):
    if comm is None:
        from mpidl.comm import init_world
        return init_world()
    return comm


def _local_params(optimizer, who):
    """The optimizer's trainable parameters (first occurrence order); raises on bad input."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{who}: expected a torch.optim.Optimizer (e.g. torch.optim.SGD(model.parameters(), "
                        f"lr=0.1)), got {type(optimizer).__name__}")
    seen, params = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError(f"{who}: the optimizer holds no trainable parameters")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point or params[0].dtype not in (
            torch.float32, torch.float64):
        raise ValueError(f"{who}: parameters must all be float32 or all float64, got "
                         f"{sorted(str(d) for d in dtypes)}")
    if any(p.device.type != "cpu" for p in params):
        raise ValueError(f"{who}: mpidl.optim works on CPU parameters; move the model with .cpu()")
    return params


def _shape_digest(tensors) -> int:
    desc = repr([(tuple(t.shape), str(t.dtype)) for t in tensors])
    return zlib.crc32(desc.encode())


def _agree(gc, err, tensors, who):
    """Collective. One max-allreduce of (error flag, digest, -digest): every rank raises together.

    A local error (``err``, an exception) is raised on every rank with the
    first failing rank's message; different parameter shapes raise ValueError.
    """
    d = float(_shape_digest(tensors)) if err is None else 0.0
    flags = gc.allreduce(np.array([0.0 if err is None else 1.0, d, -d]), op="max")
    if flags[0]:
        kind = TypeError if isinstance(err, TypeError) else ValueError
        from mpidl.comm import CollectiveError
        try:
            gc.agree(None if err is None else f"{type(err).__name__}: {err}")
        except CollectiveError as e:
            msg = str(e)
            if msg.startswith("TypeError: "):
                kind, msg = TypeError, msg[len("TypeError: "):]
            elif msg.split(":", 1)[0] in ("ValueError", "TopologyError", "MpidlError", "ConfigError"):
                msg = msg.split(": ", 1)[1]
            raise kind(msg) from None
    if flags[1] != -flags[2]:
        n = sum(t.numel() for t in tensors)
        raise ValueError(f"{who}: the ranks hold models of different shapes (this rank: {len(tensors)} tensors, "
                         f"{n} values, shape digest {int(d)}); every rank must build the same architecture")


def _sgd_hyper(optimizer, who):
    """``dict`` of torch.optim.SGD's hyper-parameters, or None for another optimizer."""
    if not isinstance(optimizer, torch.optim.SGD) or type(optimizer).step is not torch.optim.SGD.step:
        return None
    keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    g0 = optimizer.param_groups[0]
    for g in optimizer.param_groups[1:]:
        if any(_f(g.get(k)) != _f(g0.get(k)) for k in keys):
            raise ValueError(f"{who}: every parameter group of the SGD must share lr, momentum, "
                             "weight_decay and nesterov (one flat model, one update)")
    if _f(g0.get("dampening", 0)) != 0 or g0.get("maximize", False):
        raise ValueError(f"{who}: SGD with dampening or maximize is not an mpidl algorithm; "
                         "use dampening=0, maximize=False")
    return {"lr": _f(g0["lr"]), "momentum": _f(g0.get("momentum", 0.0)),
            "weight_decay": _f(g0.get("weight_decay", 0.0)), "nesterov": bool(g0.get("nesterov", False))}


def _f(v):
    return float(v) if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool) else v


def _validated(cfg, who):
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from None
    return cfg


def _cuda_aware(base, setting, device) -> bool:
    """Collective over ``base``. Whether the wrapper hands its device buffers to MPI directly: the
    rule of ``[comm] cuda_aware`` (:func:`mpidl.device.decide_cuda_aware`), taken by every rank only
    when every rank can (one allgather of the library's answer, one logical AND)."""
    from mpi4py import MPI

    from mpidl.comm.core import allgather_objects
    from mpidl.device import cuda_aware_support, decide_cuda_aware
    word = {True: "true", False: "false"}.get(setting, setting)
    supports = allgather_objects(base, cuda_aware_support() if device.type == "cuda" else None)
    use, _ = decide_cuda_aware(word, device.type, supports)
    return bool(base.allreduce(bool(use), op=MPI.LAND))


class _Distributed(StateDictMixin):
    """Collective. Base of the wrappers: flat buffer, GraphComm, agreed checks, the step loop,
    ``state_dict`` / ``load_state_dict`` (:mod:`mpidl.optim_state`)."""

    needs_loss = False

    def __init__(self, optimizer, *, topology="ring", comm=None, cuda_aware="auto", overlap=None, **kw):
        from mpidl import config as C
        from mpidl import topology as T
        from mpidl.comm import GraphComm
        from mpidl.comm.overlap import Overlap
        from mpidl.flat import FlatModel
        from mpidl.layouts import build_topology

        who = f"mpidl.optim.{type(self).__name__}"
        base = _base_comm(comm)
        n = base.Get_size()
        if isinstance(topology, T.Topology):
            topo = topology
        else:
            topo, _ = build_topology(C.TopologyConfig(name=str(topology)), n)   # raises alike on every rank
        self.optimizer, self.k, self._closed = optimizer, 0, False
        self.algo = self.state = None
        self.gc = GraphComm(base, topo)
        try:
            err, params = None, []
            try:
                params = _local_params(optimizer, who)
                self._prepare(_sgd_hyper(optimizer, who), who, **kw)
                ov = None if overlap is None else Overlap(**overlap)     # progress / bucket_mb
            except (TypeError, ValueError, MpidlError) as e:
                err = e
            if cuda_aware not in ("auto", True, False):
                err = err or ValueError(f"{who}: cuda_aware must be \"auto\", True or False, got {cuda_aware!r}")
            _agree(self.gc, err, params, who)
            self.fm = FlatModel(_Params(params), params[0].dtype)   # on the parameters' device
            if ov is not None:                  # hooks on the parameters: buckets during backward
                self.gc.overlap = ov
                self.gc.attach(self.fm)
            self.gc.cuda_aware = _cuda_aware(base, cuda_aware, self.fm.params.device)
            self.oracle = _GivenGradient(self.fm)
            self.gc.reset_counters()            # count the algorithm's traffic only, as the driver does
            if self.algo is not None:
                self.state = self.algo.init(self.fm.x, self.gc)
        except BaseException:
            self.close()
            raise

    # subclasses: _prepare (local: build self.algo or leave None) and _step
    def _prepare(self, sgd, who, **kw):
        raise NotImplementedError

    def _sync_lr(self):
        lr = _f(self.optimizer.param_groups[0]["lr"])
        if self.algo is not None and lr != self.algo.cfg.lr:
            self.algo.cfg = dataclasses.replace(self.algo.cfg, lr=lr)

    def step(self, closure=None, *, loss=None):
        """Collective. One step of the algorithm on the gradients now in ``.grad``; returns the loss.

        ``closure`` (torch convention) recomputes the loss and gradients;
        ``loss`` (a tensor or float) is this step's minibatch loss, needed by
        :class:`LeaderSGD` (the leader is the worker with the lowest running
        loss) and returned.
        """
        if self._closed:
            raise RuntimeError(f"mpidl.optim.{type(self).__name__} was closed")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.needs_loss and loss is None:
            raise ValueError(f"mpidl.optim.{type(self).__name__}.step needs this step's loss: "
                             "opt.step(loss=loss) or opt.step(closure)")
        self.fm.collect_grads()
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        self.oracle.loss = float(loss) if loss is not None else float("nan")
        self._sync_lr()
        self._step(self.k)
        self.k += 1
        return loss

    def _step(self, k):
        self.state, _ = self.algo.step(k, self.state, self.oracle, self.gc)

    def zero_grad(self, set_to_none: bool = False):
        """Local. Zero the gradients (in the flat buffer; ``set_to_none`` is accepted and ignored)."""
        self.fm.zero_grad()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def bytes_sent(self) -> int:
        """Local. Bytes this rank handed to MPI for the algorithm so far (as the driver counts them)."""
        return int(self.gc.bytes_sent)

    @property
    def comm(self):
        """The wrapper's :class:`~mpidl.comm.GraphComm` (its own duplicate of the base communicator)."""
        return self.gc

    def close(self):
        """Collective. Free the communicators (the wrapper cannot step afterwards)."""
        if self._closed:
            return
        self._closed = True
        close = getattr(self.algo, "close", None)
        if close is not None:
            close()
        if getattr(self, "gc", None) is not None:
            self.gc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the wrappers ----------------------------------------------------------------

class Consensus(_Distributed):
    """Collective. CDSGD / CDMSGD (arXiv 1706.07880) around your optimizer.

    ``Consensus(optimizer, topology="ring", momentum_form=None, form="cta",
    comm_period=1, comm=None)``.  With ``torch.optim.SGD``:
    momentum 0 runs CDSGD, x_i <- sum_j W_ij x_j - lr g_i (``form="cta"``, the
    paper's; ``"atc"`` mixes after the gradient step), mixing every
    ``comm_period`` steps; momentum mu > 0 runs CDMSGD with
    ``momentum_form`` ``"nesterov"`` (the default when the SGD has
    ``nesterov=True``) or ``"heavy-ball"`` (the default otherwise, as torch's
    plain momentum is heavy-ball).  Any other optimizer makes the local step,
    then one neighbour mix x_i <- sum_j W_ij x_j.  ``topology`` is a name
    (ring, torus, exponential, complete, ...) or a :class:`mpidl.Topology`.
    """

    def __init__(self, optimizer, topology="ring", *, momentum_form=None, form="cta", comm_period=1,
                 comm=None, cuda_aware="auto"):
        super().__init__(optimizer, topology=topology, comm=comm, cuda_aware=cuda_aware,
                         momentum_form=momentum_form, form=form, comm_period=comm_period)

    def _prepare(self, sgd, who, momentum_form, form, comm_period):
        from mpidl.algorithms import cdsgd
        if not isinstance(comm_period, int) or comm_period < 1:
            raise ValueError(f"{who}: comm_period must be an integer >= 1, got {comm_period!r}")
        self.comm_period = comm_period
        if sgd is None:
            if momentum_form is not None or form != "cta":
                raise ValueError(f"{who}: momentum_form and form apply to torch.optim.SGD; another optimizer "
                                 "makes its own local step and the mix follows it")
            return
        if sgd["momentum"] == 0:
            if momentum_form is not None:
                raise ValueError(f"{who}: momentum_form needs an SGD with momentum > 0")
            cfg = cdsgd.CDSGDConfig(lr=sgd["lr"], weight_decay=sgd["weight_decay"], comm_period=comm_period,
                                    form=form)
            self.algo = cdsgd.CDSGD(_validated(cfg, who))
            return
        if comm_period != 1 or form != "cta":
            raise ValueError(f"{who}: CDMSGD (SGD with momentum) mixes every step in the cta form; "
                             "drop comm_period / form")
        form_m = momentum_form or ("nesterov" if sgd["nesterov"] else "heavy-ball")
        cfg = cdsgd.CDMSGDConfig(lr=sgd["lr"], momentum=sgd["momentum"], momentum_form=form_m,
                                 weight_decay=sgd["weight_decay"])
        self.algo = cdsgd.CDMSGD(_validated(cfg, who))

    def _step(self, k):
        if self.algo is not None:
            return super()._step(k)
        self.optimizer.step()
        if (k + 1) % self.comm_period == 0:
            self.gc.mix(self.fm.x, out=self.fm.x)


class Centralized(_Distributed):
    """Collective. Data-parallel SGD: the gradient averaged over all ranks per step.

    ``Centralized(optimizer, comm=None, bucket_mb=1.0, progress="none")``.  With ``torch.optim.SGD``
    it runs the driver's ``centralized`` algorithm (momentum and Nesterov in
    torch's convention); with another optimizer the averaged gradient feeds
    your optimizer's step (Horovod's DistributedOptimizer).  The average is made
    in buckets of ``bucket_mb`` MiB while your ``backward`` runs, as torch DDP does
    (``[comm] bucket_mb``, :mod:`mpidl.comm.overlap`; 0 = one allreduce in ``step``),
    so call ``backward`` once per ``step``; ``progress`` is ``[comm] progress``.
    """

    def __init__(self, optimizer, *, comm=None, cuda_aware="auto", bucket_mb=None, progress="none"):
        from mpidl.comm.overlap import DEFAULT_BUCKET_MB
        bucket_mb = DEFAULT_BUCKET_MB if bucket_mb is None else bucket_mb
        super().__init__(optimizer, topology="ring", comm=comm, cuda_aware=cuda_aware,
                         overlap={"progress": progress, "bucket_mb": bucket_mb})
        if self.algo is None:
            self._mean = self.gc.gradient_mean()

    def _prepare(self, sgd, who):
        from mpidl.algorithms import cdsgd
        if sgd is not None:
            cfg = cdsgd.CentralizedConfig(lr=sgd["lr"], momentum=sgd["momentum"], nesterov=sgd["nesterov"],
                                          weight_decay=sgd["weight_decay"])
            self.algo = cdsgd.Centralized(_validated(cfg, who))

    def _step(self, k):
        if self.algo is not None:
            return super()._step(k)
        self._mean.reduce(self.fm.g, self.fm.x)
        self.optimizer.step()


class FedAvg(_Distributed):
    """Collective. Federated averaging: ``period`` local steps, then the sample-weighted average.

    ``FedAvg(optimizer, period=10, num_samples=None, comm=None)``:
    after every ``period``-th step x_i <- sum_j n_j x_j / sum_j n_j (one
    allreduce), n_j = ``num_samples`` of rank j (equal weights when None).
    With plain ``torch.optim.SGD`` (momentum 0) the local step is the driver's;
    otherwise your optimizer makes it.
    """

    def __init__(self, optimizer, period=10, *, num_samples=None, comm=None, cuda_aware="auto"):
        super().__init__(optimizer, topology="ring", comm=comm, cuda_aware=cuda_aware, period=period,
                         num_samples=num_samples)

    def _prepare(self, sgd, who, period, num_samples):
        from mpidl.algorithms import cdsgd
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"{who}: period must be an integer >= 1, got {period!r}")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"{who}: num_samples must be a positive integer, got {num_samples!r}")
        own = sgd is not None and sgd["momentum"] == 0
        cfg = cdsgd.FedAvgConfig(lr=sgd["lr"] if sgd else 1.0, local_steps=period,
                                 weight_decay=sgd["weight_decay"] if own else 0.0)
        self._own_step = own
        self.algo = cdsgd.FedAvg(_validated(cfg, who), num_samples=num_samples or 1)

    def _sync_lr(self):
        if self._own_step:
            super()._sync_lr()

    def _step(self, k):
        if self._own_step:
            return super()._step(k)
        self.optimizer.step()
        self.algo.average(k, self.state.x, self.gc)


def _own_local_step(cls, optimizer):
    """``cls`` (LSGD / EASGD) whose SGD step is the user's optimizer step; the rest is unchanged."""
    class OwnStep(cls):
        def _sgd(self, state, g, t):
            optimizer.step()
    OwnStep.__name__ = cls.__name__
    return OwnStep


class LeaderSGD(_Distributed):
    """Collective. Synchronous Leader SGD (arXiv 1905.10395): the pull toward the best worker.

    ``LeaderSGD(optimizer, lam_G=0.1, tau_G=16, window=10, step_pull=True,
    groups="all", group_size=0, lam=0.1, tau=4, p1=-1, p2=-1, comm=None)``:
    the keys of ``[algorithm] name = "lsgd"``.  Every ``tau_G``
    steps the worker with the lowest running loss (last ``window`` losses) is
    elected and its model broadcast; each worker pulls toward it,
    one-sided, as the driver's synchronous mode does.  ``step`` needs the
    loss: ``opt.step(loss=loss)``.
    """

    needs_loss = True

    def __init__(self, optimizer, *, comm=None, cuda_aware="auto", **lsgd):
        super().__init__(optimizer, topology="ring", comm=comm, cuda_aware=cuda_aware, **lsgd)

    def _prepare(self, sgd, who, **keys):
        from mpidl.algorithms import lsgd
        self.algo = _build_worker(lsgd.LSGDConfig, lsgd.LSGD, sgd, who, keys, self.optimizer)

    def leader_rank(self) -> int:
        """Local. World rank of the leader at the last election (-1 before the first)."""
        return int(self.state.lead_g)


class EASGD(_Distributed):
    """Collective. Synchronous EASGD (arXiv 1412.6651): every ``tau`` steps the elastic pull to the centre.

    ``EASGD(optimizer, beta=0.43, tau=4, comm=None)``: a = beta / N,
    x_i <- x_i - a (x_i - c), c <- c + a sum_i (x_i - c) (one allreduce), with
    the centre c replicated on every rank; :meth:`center` returns it.
    """

    def __init__(self, optimizer, *, comm=None, cuda_aware="auto", **easgd):
        super().__init__(optimizer, topology="ring", comm=comm, cuda_aware=cuda_aware, **easgd)

    def _prepare(self, sgd, who, **keys):
        from mpidl.algorithms import lsgd
        self.algo = _build_worker(lsgd.EASGDConfig, lsgd.EASGD, sgd, who, keys, self.optimizer)

    def center(self) -> torch.Tensor:
        """Local. A copy of the centre variable as a flat tensor (the parameters' layout)."""
        return torch.from_numpy(self.state.c.copy())


_WORKER_FIXED = ("name", "lr", "lr_schedule", "decay", "power", "step_epochs", "momentum", "weight_decay",
                 "asynchronous", "round_steps", "slow_rank", "slow_factor")


def _build_worker(cfg_cls, algo_cls, sgd, who, keys, optimizer):
    valid = [f.name for f in dataclasses.fields(cfg_cls) if f.name not in _WORKER_FIXED]
    bad = sorted(set(keys) - set(valid))
    if bad:
        raise TypeError(f"{who}: unknown keyword(s) {', '.join(bad)}; valid: {', '.join(valid)} "
                        "(lr, momentum and weight_decay come from the torch optimizer)")
    if sgd is not None:
        if sgd["nesterov"]:
            raise ValueError(f"{who}: the driver's {algo_cls.__name__} uses heavy-ball momentum; "
                             "use SGD(nesterov=False)")
        cfg = cfg_cls(lr=sgd["lr"], momentum=sgd["momentum"], weight_decay=sgd["weight_decay"], **keys)
        return algo_cls(_validated(cfg, who))
    cfg = cfg_cls(lr=1.0, **keys)           # lr unused: the optimizer makes the local step
    return _own_local_step(algo_cls, optimizer)(_validated(cfg, who))


# -- whole-model collectives -------------------------------------------------------

def _model_tensors(model, who):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who}: expected a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters()]
    bufs = [b for b in model.buffers()]
    if any(t.device.type != "cpu" for t in params + bufs):
        raise ValueError(f"{who}: the model must be on the CPU")
    return params, bufs


def _with_comm(comm, who, model, fn):
    from mpidl import topology as T
    from mpidl.comm import GraphComm
    base = _base_comm(comm)
    with GraphComm(base, T.ring(base.Get_size())) as gc:
        err, params, bufs = None, [], []
        try:
            params, bufs = _model_tensors(model, who)
        except (TypeError, ValueError) as e:
            err = e
        _agree(gc, err, params + bufs, who)
        fn(gc, params, bufs)
    return model


@torch.no_grad()
def broadcast_parameters(model, root: int = 0, comm=None):
    """Collective. Copy ``root``'s parameters and buffers into ``model`` on every rank; returns ``model``.

    One broadcast of all of them (packed into one float64 buffer, exact for
    float32/float64 values and integer counters).  Different architectures on
    different ranks raise ValueError on every rank.
    """
    def run(gc, params, bufs):
        if not isinstance(root, int) or not 0 <= root < gc.size:
            raise ValueError(f"broadcast_parameters: root must be a rank in 0..{gc.size - 1}, got {root!r}")
        ts = params + bufs
        if not ts:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in ts])
        gc.bcast(flat, root=root)
        off = 0
        for t in ts:
            t.copy_(flat[off:off + t.numel()].view(t.shape).to(t.dtype))
            off += t.numel()
    return _with_comm(comm, "mpidl.broadcast_parameters", model, run)


@torch.no_grad()
def average_parameters(model, comm=None):
    """Collective. Replace ``model``'s parameters by their average over the ranks; returns ``model``.

    x_bar = (1/N) sum_i x_i, summed in the parameters' own dtype (as the
    driver's average model); floating-point buffers (BatchNorm running mean
    and variance) are averaged too, integer buffers (batch counters) keep the
    largest value.  Different architectures on different ranks raise
    ValueError on every rank.
    """
    def run(gc, params, bufs):
        groups = {}
        for t in params + [b for b in bufs if b.is_floating_point()]:
            groups.setdefault(t.dtype, []).append(t)
        for dtype in sorted(groups, key=str):
            ts = groups[dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in ts])
            gc.allreduce(flat, op="mean", out=flat)
            off = 0
            for t in ts:
                t.copy_(flat[off:off + t.numel()].view(t.shape))
                off += t.numel()
        ints = [b for b in bufs if not b.is_floating_point()]
        if ints:
            flat = torch.cat([b.reshape(-1).to(torch.float64) for b in ints])
            gc.allreduce(flat, op="max", out=flat)
            off = 0
            for b in ints:
                b.copy_(flat[off:off + b.numel()].view(b.shape).to(b.dtype))
                off += b.numel()
    return _with_comm(comm, "mpidl.average_parameters", model, run)
