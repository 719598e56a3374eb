"""Run configuration: frozen dataclasses read from TOML plus ``--set a.b=c`` overrides.

A config file has the sections ``[data]``, ``[model]``, ``[topology]``,
``[algorithm]`` and ``[run]``.  Unknown sections or keys are errors that name
the key and list the valid ones.  The ``[algorithm]`` section holds ``name``
plus the fields of that algorithm's own config class (registered with
:func:`register_algorithm`), so every algorithm validates its own
hyper-parameters.

Collective use: :func:`load_collective` reads and validates on rank 0 and
broadcasts the plain dict (or the error) so every rank builds the same config
and fails together.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mpidl.errors import MpidlError

__all__ = ["Config", "DataConfig", "ModelConfig", "TopologyConfig", "RunConfig",
           "LRConfig", "register_algorithm", "algorithm_registry", "algorithm_layout", "load", "load_collective",
           "from_dict", "to_dict", "to_toml", "parse_overrides", "check_paths", "ConfigError"]


class ConfigError(MpidlError):
    pass


# -- range checks shared by every section's ``validate()`` ---------------------
# Each raises ValueError("<key> must ..., got <value>"); :func:`_build` prefixes the section, so
# the user sees one line such as ``[run] log_every must be >= 1, got 0``.
def _fail(key, rule, value):
    raise ValueError(f"{key} must {rule}, got {value!r}")


def check_int(obj, key, lo=None, hi=None):
    """``getattr(obj, key)`` is an int (not bool) with ``lo <= v <= hi`` (None = unbounded)."""
    v = getattr(obj, key)
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(key, "be an integer", v)
    if lo is not None and v < lo:
        _fail(key, f"be >= {lo}" if hi is None else f"lie in [{lo}, {hi}]", v)
    if hi is not None and v > hi:
        _fail(key, f"be <= {hi}" if lo is None else f"lie in [{lo}, {hi}]", v)


def check_float(obj, key, lo=None, hi=None, lo_open=False, hi_open=False):
    """``getattr(obj, key)`` is a finite number in the interval (open ends where asked)."""
    v = getattr(obj, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(key, "be a finite number", v)
    bad = ((lo is not None and (v <= lo if lo_open else v < lo))
           or (hi is not None and (v >= hi if hi_open else v > hi)))
    if bad:
        if hi is None:
            rule = f"be {'>' if lo_open else '>='} {lo}"
        elif lo is None:
            rule = f"be {'<' if hi_open else '<='} {hi}"
        else:
            rule = f"lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        _fail(key, rule, v)


def check_choice(obj, key, choices):
    v = getattr(obj, key)
    if v not in choices:
        names = [c if c else '""' for c in choices]
        rule = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        _fail(key, f"be {rule}", v)


def check_bool(obj, key):
    v = getattr(obj, key)
    if not isinstance(v, bool):
        _fail(key, "be true or false", v)


MODEL_NAMES = ("mlp", "cnn", "resnet20", "linear", "convex-logistic", "convex-lsq")
SCHEDULES = ("one_peer_exponential", "random_matching")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"      # fashion-mnist | mnist | digits | cifar10 | cifar100 | synthetic-lsq | synthetic-logistic
    data_dir: str = ""                  # "" -> $MPIDL_DATA or /usr/share/datasets/<dataset>
    path: str = ""                      # a user's .npz / .h5 file (x_train, y_train, x_test, y_test); overrides dataset
    augment: bool = False               # random crop (pad 4) + horizontal flip of image batches
    shards: str = ""                    # an HDF5 shard file from `mpidl shard`; overrides partition
    partition: str = "iid"              # iid | contiguous | by-class | dirichlet | given (mpidl.fit: each rank passes its own set)
    alpha: float = 0.5                  # Dirichlet concentration
    seed: int = 0                       # partition seed
    eval_samples: int = 2000            # test samples for per-agent accuracy (0 = all)
    prefetch: int = 2                   # training batches a reader thread builds ahead (0 = read in the step)
    shuffle: str = "global"             # global (permute all rows) | block (chunk-sized blocks, see shuffle_buffer)
    shuffle_buffer: int = 8             # block shuffle: rows are permuted within runs of this many blocks
    check: str = "auto"                 # NaN/inf in x: full (start-up scan) | batch (each batch read) | off | auto
    #                                     (auto: batch for HDF5 files and .npy folders, full for data in memory)

    def validate(self):
        from mpidl.convex import SHUFFLES
        from mpidl.data import DATASETS, SCHEMES
        check_choice(self, "dataset", DATASETS)
        check_choice(self, "partition", SCHEMES + ("given",))   # given: mpidl.fit, each rank its own set
        check_float(self, "alpha", lo=0, lo_open=True)
        check_int(self, "seed", lo=0)
        check_int(self, "eval_samples", lo=0)
        check_int(self, "prefetch", lo=0)
        check_choice(self, "shuffle", SHUFFLES)
        check_int(self, "shuffle_buffer", lo=1)
        check_choice(self, "check", ("auto", "full", "batch", "off"))


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"                   # mlp | cnn | resnet20 | linear | convex-logistic | convex-lsq
    hidden: tuple = (256, 128)          # MLP widths
    loss: str = "ce"                    # ce | squared (squared: needed by NEXT's Gauss-Newton surrogate)
    dtype: str = "float32"              # float32 | float64
    dropout: float = 0.0                # Dropout probability in the MLP / CNN (0 = none)
    factory: str = ""                   # "package.module:function" or "path/to/file.py:function" (a user's model)
    kwargs: tuple = ()                  # with a factory: the other [model] keys, as sorted (key, value) pairs

    def factory_kwargs(self) -> dict:
        """Local. The keyword arguments passed to the model factory."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.kwargs}

    def validate(self):
        if not (self.factory and self.name == ""):  # a factory's model has no built-in name
            check_choice(self, "name", MODEL_NAMES)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            _fail("hidden", "be a list of positive integer widths", list(self.hidden))
        check_choice(self, "loss", ("ce", "squared"))
        check_choice(self, "dtype", ("float32", "float64"))
        check_float(self, "dropout", lo=0, hi=1, hi_open=True)


@dataclass(frozen=True)
class TopologyConfig:
    name: str = "ring"                  # ring | path | star | complete | torus | hypercube | exponential | erdos_renyi
    weights: str = ""                   # metropolis | max-degree | uniform | lazy ("" = generator default)
    p: float = 0.5                      # erdos_renyi edge probability
    seed: int = 0                       # erdos_renyi seed
    shape: tuple = ()                   # torus shape
    schedule: str = ""                  # "" (fixed) | one_peer_exponential | random_matching

    def validate(self):
        from mpidl.topology import GENERATORS, WEIGHT_RULES
        check_choice(self, "name", tuple(sorted(GENERATORS)))
        check_choice(self, "weights", ("",) + tuple(WEIGHT_RULES))
        check_float(self, "p", lo=0, hi=1, lo_open=True)
        check_int(self, "seed", lo=0)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.shape):
            _fail("shape", "be a list of positive integers (torus sides)", list(self.shape))
        check_choice(self, "schedule", ("",) + SCHEDULES)


@dataclass(frozen=True)
class LRConfig:
    """Learning-rate schedule shared by the SGD-type algorithms.

    constant: lr;  diminishing: lr / (1 + decay * k)^power (k = step);
    step: lr * decay^floor(epoch / step_epochs).
    """
    lr: float = 0.01
    lr_schedule: str = "constant"
    decay: float = 0.1
    power: float = 1.0
    step_epochs: float = 10.0

    def validate(self):
        """The schedule's keys (an algorithm config calls this from its own ``validate``)."""
        check_float(self, "lr", lo=0, lo_open=True)
        check_choice(self, "lr_schedule", ("constant", "diminishing", "step"))
        check_float(self, "decay", lo=0)
        check_float(self, "power", lo=0)
        check_float(self, "step_epochs", lo=0, lo_open=True)


@dataclass(frozen=True)
class RunConfig:
    name: str = ""                      # run name ("" -> <algorithm>_<topology>)
    epochs: float = 1.0
    steps: int = 0                      # > 0 overrides epochs
    batch_size: int = 128               # 0 = full batch (the smallest shard; the whole shard for convex models)
    seed: int = 0                       # model init and data order (per rank: (seed, rank))
    log_every: int = 50                 # steps between progress lines / train-metric rows
    eval_every: int = 0                 # steps between evaluations (0 = once per epoch)
    checkpoint_every: int = 0           # steps between checkpoints (0 = every epoch, at least 100 steps apart)
    keep: int = 3                       # checkpoints kept
    out: str = "runs"                   # results go to <out>/<name>/
    resume: str = "no"                  # no | auto | <step>
    resize: str = "no"                  # no | average: resume a checkpoint of another world size (mpidl.resize)
    threads: int = 1                    # torch / numba threads per rank
    device: str = "cpu"                 # cpu | cuda | auto (cuda when every rank sees a GPU); see mpidl.device

    def validate(self):
        n = self.name
        if "/" in n or "\0" in n or n in (".", ".."):
            _fail("name", "be a plain folder name (no '/', not '.' or '..')", n)
        check_float(self, "epochs", lo=0)
        check_int(self, "steps", lo=0)
        if self.epochs <= 0 and self.steps <= 0:
            raise ValueError(f"epochs or steps must be > 0 (set epochs > 0 or steps > 0), "
                             f"got epochs = {self.epochs}, steps = {self.steps}")
        check_int(self, "batch_size", lo=0)
        check_int(self, "seed", lo=0)
        check_int(self, "log_every", lo=1)
        check_int(self, "eval_every", lo=0)
        check_int(self, "checkpoint_every", lo=0)
        check_int(self, "keep", lo=0)
        if not self.out.strip() or "\0" in self.out:
            _fail("out", "be a folder path", self.out)
        if not (self.resume in ("no", "auto") or self.resume.isdigit()):
            _fail("resume", "be no, auto or a checkpoint step (a non-negative integer)", self.resume)
        check_choice(self, "resize", ("no", "average"))
        check_choice(self, "device", ("cpu", "cuda", "auto"))
        check_int(self, "threads", lo=0)     # 0 runs one thread (the driver takes max(1, threads))


@dataclass(frozen=True)
class CommConfig:
    cuda_aware: str = "auto"            # auto | true | false: hand device tensors to MPI (see mpidl.device)
    progress: str = "none"              # none | hooks | thread: progress of pending requests in backward
    bucket_mb: float = 1.0              # centralized: gradient buckets of this many MiB (0 = one allreduce)
    # (the default equals mpidl.comm.overlap.DEFAULT_BUCKET_MB; tests/test_overlap.py checks it)

    def validate(self):
        check_choice(self, "cuda_aware", ("auto", "true", "false"))
        check_choice(self, "progress", ("none", "hooks", "thread"))
        check_float(self, "bucket_mb", lo=0.0)


_ALGOS: dict = {}
_LAYOUTS: dict = {}


def register_algorithm(name: str, config_cls, factory, layout=None):
    """Register ``name`` -> (frozen config class, factory(config, **ctx) -> Algorithm).

    ``layout`` is the family's setup function ``(cfg, world) -> Session`` (see
    :mod:`mpidl.layouts`); None selects the agent layout (one rank = one agent).
    A built-in family also needs its line in :data:`mpidl.algorithms.MODULES`
    (name -> module), which is how its module gets imported on first use.
    """
    _ALGOS[name] = (config_cls, factory)
    _LAYOUTS[name] = layout


def _load_family(name: str) -> bool:
    """Import the module that registers ``name`` (once); False if no module is known for it."""
    if name not in _ALGOS:
        from mpidl.algorithms import MODULES  # the table only: importing it imports no family
        module = MODULES.get(name)
        if module is None:
            return False
        importlib.import_module(module)
    return name in _ALGOS


class _Registry(Mapping):
    """name -> (config class, factory); a family's module is imported when its name is first read.

    Listing the names (``set(reg)``, ``name in reg``) imports nothing, so a
    torch-free family (NEXT on the convex models) never pulls in torch through
    the registry.
    """

    def __getitem__(self, name):
        if not _load_family(name):
            raise KeyError(name)
        return _ALGOS[name]

    def __contains__(self, name):
        from mpidl.algorithms import MODULES
        return name in _ALGOS or name in MODULES

    def __iter__(self):
        from mpidl.algorithms import MODULES
        return iter(sorted(set(_ALGOS) | set(MODULES)))

    def __len__(self):
        return len(list(iter(self)))


_REGISTRY = _Registry()


def algorithm_layout(name: str):
    """The layout setup function registered for algorithm ``name`` (None = agent layout)."""
    _load_family(name)
    return _LAYOUTS.get(name)


def algorithm_registry() -> Mapping:
    """The algorithm registry (read-only mapping; see :class:`_Registry`)."""
    return _REGISTRY


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    algorithm: typing.Any = None        # the algorithm's own frozen config (has .name)
    run: RunConfig = field(default_factory=RunConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.algorithm.name}_{self.topology.name}"

    # -- public API (docs/python-api.md) --------------------------------------
    @classmethod
    def from_toml(cls, path) -> "Config":
        """Local. Read and validate a TOML file (the ``python -m mpidl run --config`` format)."""
        return load(path)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Local. Validate ``{"section": {"key": value}}`` (as a TOML file reads) into a Config."""
        if not isinstance(d, dict):
            raise ConfigError(f"Config.from_dict needs a dict of sections, got {type(d).__name__}")
        return from_dict(d)

    def replace(self, changes=None, /, **sections) -> "Config":
        """Local. A new, re-validated Config with some keys changed; ``self`` is unchanged.

        Section-wise, ``cfg.replace(run={"epochs": 2}, algorithm={"lr": 0.1})``,
        or by dotted keys, ``cfg.replace({"run.epochs": 2, "algorithm.lr": 0.1})``
        (both may be combined).  Only the named keys change.  Naming a new
        ``algorithm.name`` starts that section from the new algorithm's
        defaults, since the old algorithm's keys need not exist there.
        """
        return from_dict(_merge(to_dict(self), changes, sections))

    def to_toml(self) -> str:
        """Local. The resolved config as TOML text: ``Config.from_toml`` of it gives ``self`` back."""
        return to_toml(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "topology": TopologyConfig, "run": RunConfig,
             "comm": CommConfig}


class _Override(str):
    """A --set value: the raw text, with its TOML reading in ``.parsed``."""

    parsed = None


def _coerce(section, key, ftype, value):
    if isinstance(value, _Override):  # string fields take the raw text: --set run.name=1e3
        raw = str(value)
        value = (value.parsed if isinstance(value.parsed, str) else raw) if ftype in ("str", str) \
            else value.parsed
    origin = ftype if isinstance(ftype, type) else None
    if ftype in ("tuple", tuple) or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"[{section}] {key} must be a list, got {value!r}")
    if ftype in ("bool", bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"[{section}] {key} must be true or false, got {value!r}")
    if ftype in ("int", int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"[{section}] {key} must be an integer, got {value!r}")
    if ftype in ("float", float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"[{section}] {key} must be a number, got {value!r}")
    if ftype in ("str", str):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"[{section}] {key} must be a string, got {value!r}")
    return value


# with a factory, [model] keys other than these are the factory's keyword arguments
_MODEL_OWN_KEYS = ("factory", "loss", "dtype")


def _model_values(values: dict) -> dict:
    """[model] with a factory: keep mpidl's own keys, gather every other key into ``kwargs``."""
    if not isinstance(values, dict) or not values.get("factory"):
        if isinstance(values, dict) and values.get("kwargs"):
            raise ConfigError("[model] kwargs is set by mpidl from the keys of [model] when a factory is "
                              "given; write the factory's arguments as plain [model] keys")
        return values
    factory = values["factory"]
    if not isinstance(factory, str) or ":" not in factory:
        raise ConfigError(f"[model] factory must be \"package.module:function\" or \"file.py:function\", "
                          f"got {factory!r}")
    kw = dict(values.get("kwargs") or ())
    for k, v in values.items():
        if k not in _MODEL_OWN_KEYS and k != "kwargs":
            kw[k] = str(v) if isinstance(v, _Override) and isinstance(v.parsed, str) else (
                v.parsed if isinstance(v, _Override) else v)
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    own = {k: values[k] for k in _MODEL_OWN_KEYS if k in values}
    return dict(own, name="", kwargs=tuple(sorted(kw.items())))


def _build(section: str, cls, values: dict):
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table, got {values!r}")
    if section == "model":
        values = _model_values(values)
    if section == "comm" and isinstance(values.get("cuda_aware"), bool):   # TOML true / false
        values = dict(values, cuda_aware="true" if values["cuda_aware"] else "false")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in [{section}]; "
                          f"valid keys: {', '.join(fields)}")
    kwargs = {k: _coerce(section, k, fields[k].type, v) for k, v in values.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}]: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"[{section}] {e}") from None
    return obj


def from_dict(d: dict) -> Config:
    """Local. Validate a plain dict (as read from TOML) into a :class:`Config`."""
    unknown = sorted(set(d) - set(_SECTIONS) - {"algorithm"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(list(_SECTIONS) + ['algorithm'])}")
    parts = {name: _build(name, cls, d.get(name, {})) for name, cls in _SECTIONS.items()}
    algo = d.get("algorithm", {})
    if not isinstance(algo, dict):
        raise ConfigError(f"[algorithm] must be a table, got {algo!r}")
    algo = dict(algo)
    name = _coerce("algorithm", "name", str, algo.pop("name", "cdsgd"))
    reg = algorithm_registry()
    if name not in reg:
        raise ConfigError(f"[algorithm] name: unknown algorithm {name!r}; choose one of {', '.join(sorted(reg))}")
    cfg_cls, _ = reg[name]
    parts["algorithm"] = _build("algorithm", cfg_cls, algo)
    form = getattr(cfg_cls, "MODEL_FORM", None)
    if parts["model"].factory and form:
        raise ConfigError(f"[model] factory cannot be used with algorithm {name!r}: {form}")
    return Config(**parts)


def to_dict(cfg: Config) -> dict:
    """Local. The resolved config as a plain (TOML/JSON-able) dict."""
    out = {}
    for name in ("data", "model", "topology", "algorithm", "run", "comm"):
        sec = dataclasses.asdict(getattr(cfg, name))
        out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sec.items()}
    m = cfg.model
    if m.factory:  # the TOML form: mpidl's own keys plus the factory's arguments as plain keys
        out["model"] = {"factory": m.factory, "loss": m.loss, "dtype": m.dtype, **m.factory_kwargs()}
    else:
        del out["model"]["factory"], out["model"]["kwargs"]
    return out


def parse_overrides(items) -> list:
    """``["algorithm.lr=0.05", ...]`` -> ``[(["algorithm", "lr"], 0.05), ...]`` (values parsed as TOML)."""
    out = []
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if len(path) != 2 or not all(path):
            raise ConfigError(f"--set key must be section.key, got {key!r}")
        value = _Override(raw.strip())
        try:
            value.parsed = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value.parsed = raw.strip()  # bare strings: --set topology.name=ring
        out.append((path, value))
    return out


def check_paths(cfg: Config) -> None:
    """Local. The config's paths as this process sees them: raise :class:`ConfigError` naming the key.

    ``data.data_dir`` must be a folder, ``data.shards`` a file, and ``run.out``
    a folder that exists or can be created (its nearest existing ancestor a
    writable folder).  Nothing is created.  :func:`load_collective` runs it on
    rank 0 only, so every rank gets the same verdict.
    """
    d, out = cfg.data, cfg.run.out
    if d.data_dir and not Path(d.data_dir).is_dir():
        raise ConfigError(f"[data] data_dir {d.data_dir!r} is not a folder")
    if d.path and not d.path.startswith("memory:") and Path(d.path).is_dir():
        from mpidl.sources import NPY_FILES, missing_npy
        gone = missing_npy(d.path)
        if gone:
            raise ConfigError(f"[data] path {d.path!r}: the folder has no {gone[0]} (a folder of .npy files "
                              f"needs {', '.join(NPY_FILES)})")
    elif d.path and not d.path.startswith("memory:") and not Path(d.path).is_file():
        raise ConfigError(f"[data] path {d.path!r}: no such file (an .npz or .h5 file, a folder of .npy files, "
                          "or memory:NAME)")
    if d.shards and not Path(d.shards).is_file():
        raise ConfigError(f"[data] shards {d.shards!r}: no such file (write one with `mpidl shard`)")
    target = Path(out).expanduser().absolute() / cfg.run_name
    probe = target
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link cannot be created through
            break
        probe = probe.parent
    if probe != target and not probe.is_dir():
        raise ConfigError(f"[run] out {out!r} cannot be created: {str(probe)!r} is not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"[run] out {out!r} cannot be created: {str(probe)!r} is not writable")
    if probe == target and not probe.is_dir():
        raise ConfigError(f"[run] out {out!r}: {str(target)!r} exists and is not a folder")


def load(path=None, overrides=(), *, paths=True) -> Config:
    """Local. Read a TOML file (or defaults when ``path`` is None) and apply overrides.

    ``paths=True`` also checks the paths the config names (:func:`check_paths`).
    """
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            d = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        _anchor_paths(d, p.resolve().parent)
    for (sec, key), value in parse_overrides(overrides):
        if not isinstance(d.setdefault(sec, {}), dict):
            raise ConfigError(f"--set {sec}.{key}: [{sec}] is not a table")
        d[sec][key] = value
    cfg = from_dict(d)
    if paths:
        check_paths(cfg)
    return cfg


def _anchor_paths(d: dict, base: Path) -> None:
    """Paths written in a config file are relative to that file: ``[data] path`` and a
    ``file.py:function`` model factory become absolute (``--set`` values stay relative to the cwd)."""
    data, model = d.get("data"), d.get("model")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"] \
            and not data["path"].startswith("memory:") and not Path(data["path"]).is_absolute():
        data["path"] = str(base / data["path"])
    if isinstance(model, dict) and isinstance(model.get("factory"), str):
        mod, sep, fn = model["factory"].rpartition(":")
        if sep and mod.endswith(".py") and not Path(mod).is_absolute():
            model["factory"] = f"{base / mod}:{fn}"


def load_collective(comm, path=None, overrides=()) -> Config:
    """Collective. Rank 0 reads and validates; every rank gets the same config or the same error.

    ``comm`` is an mpi4py communicator or a :class:`~mpidl.comm.GraphComm`.
    """
    rank = comm.Get_rank() if hasattr(comm, "Get_rank") else comm.rank
    payload = None
    if rank == 0:
        try:
            payload = ("ok", to_dict(load(path, overrides)))
        except MpidlError as e:
            payload = ("error", str(e))
    payload = comm.bcast(payload, root=0)
    if payload[0] == "error":
        raise ConfigError(payload[1])
    return from_dict(payload[1])


def dumps(cfg: Config) -> str:
    """Local. The resolved config as JSON (stored with results and checkpoints)."""
    return json.dumps(to_dict(cfg), sort_keys=True)


def _merge(d: dict, changes, sections: dict) -> dict:
    """``to_dict`` output with dotted ``changes`` and per-section ``sections`` applied."""
    flat = []
    for key, value in dict(changes or {}).items():
        parts = str(key).split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"replace: key must be section.key, got {key!r}")
        flat.append((parts[0], parts[1], value))
    for sec, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError(f"replace: {sec}= must be a dict of keys, got {values!r}")
        flat.extend((sec, k, v) for k, v in values.items())
    for sec, key, _ in flat:
        if sec not in d:
            raise ConfigError(f"unknown section {sec!r}; valid: {', '.join(d)}")
    new_algo = [v for sec, key, v in flat if sec == "algorithm" and key == "name"]
    if new_algo and new_algo[-1] != d["algorithm"].get("name"):
        d["algorithm"] = {}
    for sec, key, value in flat:
        d[sec][key] = list(value) if isinstance(value, tuple) else value
    return d


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)            # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


def to_toml(cfg: Config) -> str:
    """Local. ``cfg`` as TOML text with every key written (round-trips through :func:`load`)."""
    lines = []
    for sec, values in to_dict(cfg).items():
        lines.append(f"[{sec}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)
