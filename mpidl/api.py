"""The Python entry points: ``mpidl.train(cfg)`` and ``mpidl.fit(model, train, ...)``.

Both are thin, as the CLI is: they build (or take) one validated
:class:`mpidl.Config` and call the one driver (:func:`mpidl.driver.train`), so
checkpoints, resume, preemption, the results file and progress output are the
CLI's.  :func:`fit` turns its arguments into the keys a TOML file would hold:
a model object or callable becomes a ``[model] factory`` registered in this
process (:func:`mpidl.models.register_factory`), arrays become a ``[data]
path`` of an in-memory set (:func:`mpidl.sources.register_arrays`), keywords
become the keys of ``[algorithm]``, ``[run]``, ``[model]``, ``[data]`` and
``[topology]``.  See docs/python-api.md.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import zlib
from pathlib import Path

import numpy as np

from mpidl import config as C
from mpidl.errors import MpidlError

__all__ = ["train", "fit", "FitResult"]

# keyword -> section, in this order of precedence for names several sections share
_SECTION_ORDER = ("algorithm", "run", "model", "data", "topology", "comm")
# keys fit sets itself (its named arguments) or that belong to no keyword
_RESERVED = {"name", "factory", "kwargs", "path", "dataset", "partition", "epochs", "batch_size", "lr", "out",
             "seed"}


def _world(comm):
    if comm is not None:
        return comm
    from mpidl.comm import init_world
    return init_world()


def train(cfg, comm=None) -> dict:
    """Collective. Run the job ``cfg`` describes (as ``python -m mpidl run``); return the final metrics.

    ``comm`` is an mpi4py communicator (default ``MPI.COMM_WORLD``; under a
    plain ``python script.py`` a world of one rank).  Every rank gets the same
    dict: ``test_acc``, ``test_loss``, ``train_loss``, ``bytes_sent``,
    ``step``, ``out`` (the run folder, holding ``results.h5`` and
    ``checkpoints/``) and the family's own metrics.
    """
    if not isinstance(cfg, C.Config):
        raise TypeError(f"mpidl.train needs an mpidl.Config (Config.from_toml(path), Config.from_dict(d)), "
                        f"got {type(cfg).__name__}")
    import logging
    from mpidl.driver import train as run
    world = _world(comm)
    if not logging.getLogger("mpidl").handlers:     # the CLI's output, unless the user set up logging
        from mpidl.log import setup
        setup(world.Get_rank())
    return run(cfg, world)


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns (on every rank).

    ``metrics``: the driver's final metrics (equal on every rank; ``test_acc``,
    ``test_loss``, ``train_loss``, ``bytes_sent``, ...).  ``results_path``: the
    results file (HDF5, :mod:`mpidl.metrics`).  ``out``: the run folder (with
    ``checkpoints/``).  ``config``: the validated :class:`mpidl.Config` that ran
    (``config.to_toml()`` reproduces the run from the CLI when the data and
    model are files).  ``model``: this rank's trained agent model (a torch
    module; None for the layer/stage-parallel families pdADMM and fdg and for
    the convex models), ``params``: its flat parameter vector (NumPy).
    """

    metrics: dict
    results_path: str
    out: str
    config: object
    model: object = None
    params: object = None
    _comm: object = dataclasses.field(default=None, repr=False)

    def average_model(self):
        """Collective. A copy of :attr:`model` holding the average of every rank's parameters.

        The consensus average x_bar = (1/N) sum_i x_i, the model the driver
        evaluates (floating buffers averaged too, see
        :func:`mpidl.average_parameters`).
        """
        if self.model is None:
            raise MpidlError(f"algorithm {self.config.algorithm.name!r} with model {self.config.model.name!r} "
                             "has no per-rank torch model to average")
        from mpidl.optim import average_parameters
        return average_parameters(copy.deepcopy(self.model), comm=self._comm)


def _as_numpy(a, what):
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu().numpy()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"mpidl.fit: {what} must be a NumPy array or a torch tensor, got {type(a).__name__}")
    return a


def _pair(arg, what):
    if not isinstance(arg, (tuple, list)) or len(arg) != 2:
        raise TypeError(f"mpidl.fit: {what} must be (x, y) arrays, a data file path or a built-in data set "
                        f"name, got {type(arg).__name__}")
    return _as_numpy(arg[0], f"{what}[0] (x)"), _as_numpy(arg[1], f"{what}[1] (y)")


def _valid_options():
    """{key: section} of every keyword fit accepts in ``**options`` (algorithm keys: all algorithms)."""
    from mpidl.config import algorithm_registry
    out = {}
    for sec in _SECTION_ORDER:
        if sec == "algorithm":
            names = {f.name for cls, _ in algorithm_registry().values() for f in dataclasses.fields(cls)}
        else:
            names = {f.name for f in dataclasses.fields(C._SECTIONS[sec])}
        for n in sorted(names - _RESERVED):
            out.setdefault(n, sec)
    return out


def _data_section(train, test, partition, num_classes):
    """The ``[data]`` keys for ``train``/``test``; registers arrays in memory (local, validated)."""
    from mpidl import data as D
    from mpidl import sources as S
    if isinstance(train, (str, os.PathLike)):
        if test is not None:
            raise TypeError("mpidl.fit: with a data file or data set name as train, leave test=None "
                            "(the file holds x_test, y_test)")
        if partition == "given":
            raise ValueError('mpidl.fit: partition="given" needs arrays (each rank passes its own shard)')
        s = os.fspath(train)
        if s in D.DATASETS:
            return {"dataset": s}, None
        if not Path(s).exists():
            raise ValueError(f"mpidl.fit: data file {s} not found (built-in sets: {', '.join(D.DATASETS)})")
        S.open_path(s)                           # validate here, before any collective
        return {"path": str(Path(s).resolve())}, None
    x, y = _pair(train, "train")
    xt, yt = (x, y) if test is None else _pair(test, "test")
    path = S.register_arrays(x, y, xt, yt, num_classes=num_classes)
    try:
        S.open_path(path)                        # lengths, label range, finite values: one clear error
    except S.SourceError as e:
        S.unregister_arrays(path)
        raise ValueError(f"mpidl.fit: {str(e).replace(path + ': ', '')}") from None
    return {"path": path}, path


def _model_section(model):
    import torch
    from mpidl.models import register_factory
    if isinstance(model, str):
        if ":" in model:
            return {"factory": model}
        return {"name": model}
    if isinstance(model, torch.nn.Module):
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("mpidl.fit: the model has no trainable parameters")
        if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
            raise ValueError("mpidl.fit: pass the model on the CPU (model.cpu()) and choose the device with "
                             "device=\"cuda\" (or \"auto\"): every rank then moves its copy to its own GPU")
        template = model

        def from_module(input_shape, num_classes):
            return copy.deepcopy(template)
        from_module.__qualname__ = f"fit.model.{type(model).__qualname__}"
        return {"factory": register_factory(from_module)}
    if callable(model):
        return {"factory": register_factory(model)}
    raise TypeError("mpidl.fit: model must be a torch.nn.Module, a factory callable "
                    "(input_shape, num_classes, **kw) -> nn.Module, a built-in model name or a "
                    f"\"module:function\" spec; got {type(model).__name__}")


def _build_config(model, train, test, algorithm, topology, epochs, batch_size, lr, out, partition, seed,
                  options):
    """Local. ``(Config, memory path or None)`` from fit's arguments; raises TypeError/ValueError."""
    if not isinstance(algorithm, str):
        raise TypeError(f"mpidl.fit: algorithm must be a name, got {type(algorithm).__name__}")
    if not isinstance(topology, str):
        raise TypeError(f"mpidl.fit: topology must be a name (ring, torus, ...), got {type(topology).__name__}")
    import torch
    valid = _valid_options()
    model_section = _model_section(model)
    if "factory" in model_section and not isinstance(model, torch.nn.Module):
        # the user's factory: every other keyword is one of its arguments (extra [model] keys)
        valid.update({k: "model" for k in options if k not in valid and k != "num_classes"})
    bad = sorted(k for k in options if k not in valid and k != "num_classes")
    if bad:
        raise TypeError(f"mpidl.fit got unexpected keyword argument(s) {', '.join(bad)}; valid: "
                        f"{', '.join(sorted(list(valid) + ['num_classes', 'run_name']))}")
    num_classes = options.pop("num_classes", None)
    d = {"data": {"partition": partition, "seed": seed},
         "model": model_section, "topology": {"name": topology},
         "algorithm": {"name": algorithm},
         "run": {"epochs": epochs, "batch_size": batch_size, "seed": seed,
                 "out": str(out) if out is not None else "runs"}}
    if lr is not None:
        d["algorithm"]["lr"] = lr
    reg = C.algorithm_registry()
    own = {f.name for f in dataclasses.fields(reg[algorithm][0])} if algorithm in reg else set()
    for k, v in options.items():
        if k in own:
            sec = "algorithm"
        else:
            secs = [s for s in _SECTION_ORDER[1:] if k in {f.name for f in dataclasses.fields(C._SECTIONS[s])}]
            if not secs and valid.get(k) == "model":
                secs = ["model"]
            if not secs:
                raise TypeError(f"mpidl.fit: {k}= is not a key of algorithm {algorithm!r}; its keys: "
                                f"{', '.join(sorted(own - _RESERVED))}")
            sec = secs[0]
        d.setdefault(sec, {})[k] = list(v) if isinstance(v, tuple) else v
    data, path = _data_section(train, test, partition, num_classes)
    d["data"].update(data)
    try:
        cfg = C.from_dict(d)
    except MpidlError as e:
        if path is not None:
            from mpidl.sources import unregister_arrays
            unregister_arrays(path)
        raise ValueError(f"mpidl.fit: {e}") from None
    return cfg, path


def fit(model, train, test=None, *, algorithm: str = "cdmsgd", topology: str = "ring", epochs: float = 1.0,
        batch_size: int = 128, lr=None, out=None, partition: str = "iid", seed: int = 0, comm=None,
        **options) -> FitResult:
    """Collective. Train ``model`` on ``train`` with a decentralized algorithm; returns a :class:`FitResult`.

    Every rank calls it with the same arguments (``MPI.COMM_WORLD`` or
    ``comm``; a plain ``python script.py`` is one rank).

    * ``model``: a ``torch.nn.Module`` (every rank the same architecture; the
      weights of rank 0 are used so all agents start equal), a factory
      ``f(input_shape, num_classes, **kw) -> nn.Module`` (called after
      ``torch.manual_seed(seed)``; ``**kw`` are the extra ``[model]`` keys),
      a built-in name (``"mlp"``, ``"cnn"``, ``"resnet20"``, ``"linear"``,
      ``"convex-logistic"``, ``"convex-lsq"``) or a ``"module:function"`` spec.
    * ``train``, ``test``: ``(x, y)`` NumPy arrays or torch tensors (integer
      labels: classification; float targets: regression), every rank passing
      the full set for mpidl to partition (``partition`` = iid, contiguous,
      by-class, dirichlet), or ``partition="given"`` when each rank passes its
      own shard (and the same ``test``).  ``test=None`` evaluates on ``train``.
      Or ``train`` is a data file (``.npz``/``.h5``, as ``[data] path``) or a
      built-in set name (``"digits"``, ``"fashion-mnist"``, ...).
    * ``**options``: keys of the TOML sections, by name: the algorithm's
      (``momentum``, ``weight_decay``, ``tau``, ``hidden`` for pdADMM ...),
      ``[run]``'s (``steps``, ``log_every``, ``eval_every``,
      ``checkpoint_every``, ``resume``, ``name`` is ``run_name``...),
      ``[model]``'s (``hidden``, ``loss``, ``dtype``, ``dropout``),
      ``[data]``'s (``alpha``, ``eval_samples``, ``augment``, ``prefetch``, ``shuffle``, ...) and
      ``[topology]``'s (``weights``, ``schedule``, ``shape``, ``p``); plus
      ``num_classes``.  An unknown name is a TypeError listing the valid ones.

    Bad input (a model that is neither a Module nor callable, x and y of
    different lengths, labels out of range, unknown options, ranks passing
    different arguments) raises one TypeError/ValueError on every rank before
    the run starts and before anything is written under ``out``.
    """
    options = dict(options)
    run_name = options.pop("run_name", None)
    base = _world(comm)
    err, cfg, path = None, None, None
    try:
        cfg, path = _build_config(model, train, test, algorithm, topology, epochs, batch_size, lr, out,
                                  partition, seed, options)
        if run_name is not None:
            cfg = cfg.replace(run={"name": str(run_name)})
    except (TypeError, ValueError, MpidlError) as e:
        err = e if isinstance(e, (TypeError, ValueError)) else ValueError(f"mpidl.fit: {e}")
    try:
        _agree_config(base, err, cfg)
        import torch
        if isinstance(model, torch.nn.Module):
            from mpidl.optim import broadcast_parameters
            broadcast_parameters(model, root=0, comm=base)      # all agents start from rank 0's weights
        metrics = train_cfg(cfg, base)
        out_dir = metrics.get("out") or str(Path(cfg.run.out) / cfg.run_name)
        trained, params = _final_model(cfg, base, out_dir, int(metrics.get("step", 0)), model)
    finally:
        if path is not None:
            from mpidl.sources import unregister_arrays
            unregister_arrays(path)
    return FitResult(metrics=metrics, results_path=str(Path(out_dir) / "results.h5"), out=out_dir, config=cfg,
                     model=trained, params=params, _comm=comm)


train_cfg = train


def _agree_config(base, err, cfg):
    """Collective. Raise the first rank's error everywhere, or a ValueError when the ranks' configs differ
    (under partition="given" the data paths differ by design and are left out of the comparison)."""
    from mpidl import topology as T
    from mpidl.comm import CollectiveError, GraphComm
    digest = 0.0
    if cfg is not None:
        d = C.to_dict(cfg)
        if cfg.data.partition == "given":
            d["data"].pop("path", None)
        digest = float(zlib.crc32(repr(sorted((k, sorted(v.items())) for k, v in d.items())).encode()))
    with GraphComm(base, T.ring(base.Get_size())) as gc:
        flags = gc.allreduce(np.array([0.0 if err is None else 1.0, digest, -digest]), op="max")
        if flags[0]:
            try:
                gc.agree(None if err is None else f"{type(err).__name__}: {err}")
            except CollectiveError as e:
                kind, _, msg = str(e).partition(": ")
                raise (TypeError if kind == "TypeError" else ValueError)(msg) from None
        if flags[1] != -flags[2]:
            raise ValueError("mpidl.fit: the ranks passed different arguments or data (every rank must call "
                             "fit with the same model, data and options; use partition=\"given\" for "
                             "per-rank shards)")


def _final_model(cfg, base, out_dir, step, model):
    """Collective. This rank's trained model from the checkpoint of the run's last ``step``:
    ``(module or None, flat x)`` (the driver checkpoints the last step of every invocation)."""
    from mpidl import topology as T
    from mpidl.checkpoint import CheckpointStore
    from mpidl.comm import GraphComm
    from mpidl.layouts import CONVEX_MODELS, setup_agents, setup_for
    with GraphComm(base, T.ring(base.Get_size())) as gc:
        store = CheckpointStore(Path(out_dir) / "checkpoints", gc)
        if step not in store.steps():
            return None, None
        state, _ = store.load(step)
    if setup_for(cfg) is not setup_agents:      # layer / stage layouts: no whole model per rank
        return None, None
    from mpidl.algorithms.base import state_from_dict
    cls = getattr(C.algorithm_registry()[cfg.algorithm.name][1], "state_cls", None)
    x = getattr(state_from_dict(cls, state["algo"]), "x", None) if cls is not None else state["algo"].get("x")
    x = None if x is None else np.array(x)
    if x is None or (cfg.model.name in CONVEX_MODELS and not cfg.model.factory):
        return None, x
    import torch
    net = _rebuild(cfg, model)
    params = [p for p in net.parameters() if p.requires_grad]
    dtype = torch.float64 if cfg.model.dtype == "float64" else torch.float32
    net.to(dtype)
    with torch.no_grad():
        off = 0
        for p in params:
            p.copy_(torch.from_numpy(x[off:off + p.numel()]).view(p.shape))
            off += p.numel()
        own = dict(net.named_buffers())
        for name, value in state.get("buffers", {}).items():
            if name in own:
                own[name].copy_(torch.from_numpy(np.asarray(value)))
    return net, x


def _rebuild(cfg, model):
    """Local. A module of the run's architecture: the user's own object (trained in place), or the
    built-in / factory model built for the run's data shapes."""
    import torch
    if isinstance(model, torch.nn.Module):
        return model
    from mpidl.models import make_model
    from mpidl.sources import open_path
    if cfg.data.path:
        src = open_path(cfg.data.path, check=False)
        shape, ncls = src.input_shape, src.num_classes
    else:
        from mpidl.data import load_dataset
        ds = load_dataset(cfg.data.dataset, cfg.data.data_dir or None, seed=cfg.data.seed)
        shape, ncls = ds.input_shape, ds.num_classes
    return make_model(cfg.model, shape, ncls, seed=cfg.run.seed)
