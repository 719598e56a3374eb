"""Datasets, partitioners and per-agent data (HDF5 shard files live in :mod:`mpidl.shards`).

Loaders (:func:`load_dataset`) return a :class:`Dataset` of float32 inputs:

* ``fashion-mnist`` and ``mnist``: the standard IDX ``.gz`` files
  (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
  ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``), images
  scaled to [0, 1] (``u8 / 255``) with shape (N, 1, 28, 28).  Files are
  looked up in ``data_dir`` if given, else ``$MPIDL_DATA`` if set, else
  ``/usr/share/datasets/<name>`` (where Debian's ``dataset-fashion-mnist``
  package puts them); the first two may hold the files directly or in a
  ``<name>/`` sub-folder.
* ``digits``: scikit-learn's bundled 8x8 digits, (N, 1, 8, 8) in [0, 1],
  a seeded 80/20 train/test split.
* ``synthetic-lsq``: least squares with a planted model,
  ``y = X w_true + noise * e``, ``X, e ~ N(0, 1)`` (float32 targets,
  ``num_classes = 0``).
* ``synthetic-logistic``: logistic regression with a planted model,
  ``P(y = 1 | x) = sigmoid(x . w_true)``, labels in {0, 1}.

Partitioners (:func:`partition`) split the training set over agents; every
scheme is seeded, disjoint and covering:

* ``iid``: a seeded permutation cut into near-equal parts;
* ``contiguous``: the file order cut into near-equal parts;
* ``by-class``: every agent gets whole classes (the non-IID split of the
  CDSGD paper, arXiv 1706.07880); with more agents than classes each class is
  split among a group of agents, so every agent holds exactly one class;
* ``dirichlet``: label skew, for each class c the fractions going to the
  agents are drawn from Dirichlet(alpha, ..., alpha) (small alpha = strong
  skew), redrawn until every agent has at least ``min_size`` samples.

Index arrays are returned sorted, so a shard keeps the file order.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpidl.errors import MpidlError
from mpidl.shards import Shard, read_shard, shard_info, write_shards  # noqa: F401  (re-exported)
from mpidl.sources import register_arrays, unregister_arrays  # noqa: F401  (re-exported)

__all__ = [
    "Dataset", "Shard", "DATASETS", "SCHEMES", "load_dataset", "partition", "class_histogram",
    "write_shards", "read_shard", "shard_info", "load_agent_data", "resolve_data_dir", "register_arrays",
    "unregister_arrays",
]

log = logging.getLogger("mpidl.data")

DATASETS = ("fashion-mnist", "mnist", "digits", "synthetic-lsq", "synthetic-logistic", "cifar10", "cifar100")
SCHEMES = ("iid", "contiguous", "by-class", "dirichlet")

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET = {
    "fashion-mnist": ("on Debian/Ubuntu: apt-get install dataset-fashion-mnist (puts them in "
                      "/usr/share/datasets/fashion-mnist); or download the four IDX .gz files from "
                      "https://github.com/zalandoresearch/fashion-mnist (data/fashion)"),
    "mnist": ("download the four IDX .gz files (train-images-idx3-ubyte.gz, ...) from "
              "https://ossci-datasets.s3.amazonaws.com/mnist/ or http://yann.lecun.com/exdb/mnist/"),
}


class DataError(MpidlError, ValueError):
    """A dataset, partition or shard file that cannot be used."""


@dataclass
class Dataset:
    """Local. A train/test split held in memory.

    ``x_*`` are float32; ``y_*`` are int64 class labels (or float32 targets
    when ``num_classes == 0``, regression).  ``w_true`` is the planted model of
    a synthetic problem (None otherwise).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple
    w_true: np.ndarray | None = None
    source: str = ""
    info: dict = field(default_factory=dict)

    def __repr__(self):
        return (f"Dataset({self.name!r}, train {self.x_train.shape}, test {self.x_test.shape}, "
                f"classes {self.num_classes})")


# -- locating files ------------------------------------------------------------
def resolve_data_dir(name: str, data_dir=None) -> list:
    """Local. Folders searched for ``name``: the first of ``data_dir``, ``$MPIDL_DATA`` and
    ``/usr/share/datasets`` that is set, with its ``<name>/`` sub-folder first."""
    base = data_dir or os.environ.get("MPIDL_DATA")
    if not base:
        return [Path("/usr/share/datasets") / name]
    return [Path(base) / name, Path(base)]


def _find_idx(name, data_dir):
    """Return {key: path} of the four IDX files, or raise a DataError naming where it looked."""
    cands = resolve_data_dir(name, data_dir)
    for d in cands:
        found = {}
        for key, stem in _IDX_FILES.items():
            for fname in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
                if (d / fname).is_file():
                    found[key] = d / fname
                    break
        if len(found) == len(_IDX_FILES):
            return found
        if found:  # a folder with some but not all files: name the missing one
            missing = [d / (_IDX_FILES[k] + ".gz") for k in _IDX_FILES if k not in found]
            raise DataError(f"{name}: file {missing[0]} not found (the folder {d} holds only "
                            f"{len(found)} of the 4 IDX files); {_HOW_TO_GET[name]}")
    where = ", ".join(str(d) for d in cands)
    raise DataError(f"{name}: file {cands[0] / (_IDX_FILES['x_train'] + '.gz')} not found (looked in {where}); "
                    f"{_HOW_TO_GET[name]}; then pass --data-dir DIR or set MPIDL_DATA=DIR")


def _read_idx(path: Path, name: str) -> np.ndarray:
    """Local. Read one IDX file (optionally gzip'ed) as a uint8 array, checking its size."""
    hint = f"the file is damaged or truncated; delete it and fetch it again ({_HOW_TO_GET.get(name, '')})"
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: cannot read {path}: {e}; {hint}") from None
    if len(raw) < 4:
        raise DataError(f"{name}: {path} is only {len(raw)} bytes long; {hint}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{name}: {path} is not an IDX file of unsigned bytes "
                        f"(magic {raw[:4].hex()}); {hint}")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{name}: {path} has a truncated header; {hint}")
    shape = struct.unpack(">" + "I" * ndim, raw[4:head])
    need = int(np.prod(shape))
    if len(raw) - head != need:
        raise DataError(f"{name}: {path} holds {len(raw) - head} data bytes but its header "
                        f"announces shape {shape} = {need} bytes; {hint}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def _load_idx_raw(name, data_dir):
    """uint8 images (N, 28, 28) and int64 labels for the IDX datasets, checked for consistency."""
    files = _find_idx(name, data_dir)
    arrs = {k: _read_idx(p, name) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrs[f"x_{split}"], arrs[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{name}: {files[f'x_{split}']} ({x.shape}) and {files[f'y_{split}']} "
                            f"({y.shape}) do not match (images N x H x W, labels N)")
    return arrs, str(files["x_train"].parent)


def _to_float_images(u8):
    x = u8.astype(np.float32)
    x /= np.float32(255.0)
    return x.reshape((len(u8), 1) + u8.shape[1:])


def _load_idx(name, data_dir):
    arrs, source = _load_idx_raw(name, data_dir)
    ytr = arrs["y_train"].astype(np.int64)
    yte = arrs["y_test"].astype(np.int64)
    return Dataset(name, _to_float_images(arrs["x_train"]), ytr, _to_float_images(arrs["x_test"]), yte,
                   num_classes=int(max(ytr.max(), yte.max())) + 1,
                   input_shape=(1,) + arrs["x_train"].shape[1:], source=source)


def _load_digits(seed, test_fraction=0.2):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits: needs scikit-learn (pip install scikit-learn, or mpidl[data])") from None
    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    if not 0 < test_fraction < 1:
        raise DataError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return Dataset("digits", x[tr], y[tr], x[te], y[te], num_classes=10, input_shape=(1, 8, 8),
                   source="sklearn.datasets.load_digits", info={"test_fraction": test_fraction})


def _synthetic(name, seed, n=1000, n_test=None, dim=20, noise=0.1):
    n, dim = int(n), int(dim)
    n_test = max(1, n // 4) if n_test is None else int(n_test)
    if n < 1 or dim < 1 or n_test < 1:
        raise DataError(f"{name}: n, n_test and dim must be positive, got n={n}, n_test={n_test}, dim={dim}")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(dim)
    x = rng.standard_normal((n + n_test, dim))
    z = x @ w
    if name == "synthetic-lsq":
        y = (z + noise * rng.standard_normal(n + n_test)).astype(np.float32)
        ncls = 0
    else:
        p = 1.0 / (1.0 + np.exp(-z))
        y = (rng.random(n + n_test) < p).astype(np.int64)
        ncls = 2
    x = x.astype(np.float32)
    return Dataset(name, x[:n], y[:n], x[n:], y[n:], num_classes=ncls, input_shape=(dim,),
                   w_true=w.astype(np.float32), source=f"synthetic(seed={seed})",
                   info={"n": n, "n_test": n_test, "dim": dim, "noise": float(noise)})


def load_dataset(name: str, data_dir=None, seed: int = 0, path=None, **kwargs) -> Dataset:
    """Local. Load ``name`` (one of :data:`DATASETS`), or the file / in-memory set ``path``
    (see :mod:`mpidl.sources`; lazy HDF5 inputs are read in full here); see the module docstring.

    ``seed`` selects the synthetic problem and the digits split; ``kwargs``
    go to the synthetic generators (``n``, ``n_test``, ``dim``, ``noise``) or
    digits (``test_fraction``).  A missing or damaged file raises
    :class:`DataError` naming the path and how to get the data.
    """
    if path:
        from mpidl.sources import open_path
        src = open_path(path)
        x, xt = np.asarray(src.x_train), np.asarray(src.x_test)
        for what, arr in (("x_train", x), ("x_test", xt)):
            if not np.all(np.isfinite(arr)):
                raise DataError(f"{path}: {what} holds NaN or inf")
        return Dataset(src.name, x, src.y_train, xt, src.y_test, num_classes=src.num_classes,
                       input_shape=src.input_shape, source=str(path), info=dict(src.provenance))
    if name in ("fashion-mnist", "mnist"):
        if kwargs:
            raise DataError(f"{name}: unexpected options {sorted(kwargs)}")
        return _load_idx(name, data_dir)
    if name in ("cifar10", "cifar100"):
        from mpidl.sources import cifar_float, read_cifar
        u8, y, u8t, yt, mean, std, folder = read_cifar(name, data_dir)
        return Dataset(name, cifar_float(u8, mean, std), y, cifar_float(u8t, mean, std), yt,
                       num_classes=10 if name == "cifar10" else 100, input_shape=(3, 32, 32),
                       source=str(folder))
    if name == "digits":
        return _load_digits(seed, **kwargs)
    if name in ("synthetic-lsq", "synthetic-logistic"):
        bad = set(kwargs) - {"n", "n_test", "dim", "noise"}
        if bad:
            raise DataError(f"{name}: unknown options {sorted(bad)} (use n, n_test, dim, noise)")
        return _synthetic(name, seed, **kwargs)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# -- partitions ----------------------------------------------------------------
def _is_classification(y) -> bool:
    return np.issubdtype(np.asarray(y).dtype, np.integer)


def class_histogram(y, num_classes=None) -> np.ndarray:
    """Local. Counts per class (length ``num_classes``); empty for regression targets."""
    y = np.asarray(y)
    if not _is_classification(y):
        return np.zeros(0, dtype=np.int64)
    k = int(num_classes) if num_classes else (int(y.max()) + 1 if y.size else 0)
    return np.bincount(y, minlength=k).astype(np.int64)


def partition(y, num_agents: int, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
              min_size: int = 1, max_tries: int = 1000) -> list:
    """Local. Split ``range(len(y))`` into ``num_agents`` sorted, disjoint, covering index arrays.

    Deterministic in ``(y, num_agents, scheme, seed, alpha)``, so every rank
    computes the same split.  Raises :class:`DataError` if some agent would
    get no sample.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"partition: labels must be one-dimensional, got shape {y.shape}")
    n = len(y)
    if isinstance(num_agents, bool) or int(num_agents) != num_agents or num_agents < 1:
        raise DataError(f"partition: num_agents must be a positive integer, got {num_agents!r}")
    num_agents = int(num_agents)
    if n < num_agents:
        raise DataError(f"partition: {n} samples cannot give each of {num_agents} agents at least one")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_agents)
    elif scheme == "contiguous":
        parts = np.array_split(np.arange(n), num_agents)
    elif scheme in ("by-class", "dirichlet"):
        if not _is_classification(y):
            raise DataError(f"partition: scheme {scheme!r} needs integer class labels "
                            "(regression targets: use iid or contiguous)")
        classes = np.unique(y)
        by_class = [np.flatnonzero(y == c) for c in classes]
        parts = (_by_class(by_class, num_agents, rng) if scheme == "by-class"
                 else _dirichlet(by_class, num_agents, rng, alpha, min_size, max_tries))
    else:
        raise DataError(f"partition: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    empty = [i for i, p in enumerate(parts) if p.size == 0]
    if empty:
        raise DataError(f"partition {scheme!r}: agent(s) {empty[:8]} would get no data "
                        f"({n} samples, {num_agents} agents); use fewer agents or another scheme")
    return parts


def _by_class(by_class, num_agents, rng):
    c = len(by_class)
    if num_agents <= c:  # agent i gets the classes of block i (whole classes)
        blocks = np.array_split(np.arange(c), num_agents)
        return [np.concatenate([by_class[k] for k in b]) for b in blocks]
    # more agents than classes: class k is split among the agents of group k
    groups = np.array_split(np.arange(num_agents), c)
    parts = [None] * num_agents
    for k, g in enumerate(groups):
        if len(by_class[k]) < len(g):
            raise DataError(f"partition 'by-class': class {k} has {len(by_class[k])} samples for "
                            f"{len(g)} agents; use fewer agents")
        for a, chunk in zip(g, np.array_split(rng.permutation(by_class[k]), len(g))):
            parts[a] = chunk
    return parts


def _dirichlet(by_class, num_agents, rng, alpha, min_size, max_tries):
    if not alpha > 0:
        raise DataError(f"partition 'dirichlet': alpha must be > 0, got {alpha}")
    n = sum(len(ix) for ix in by_class)
    if n < num_agents * min_size:
        raise DataError(f"partition 'dirichlet': {n} samples cannot give {num_agents} agents "
                        f"{min_size} each")
    for _ in range(max_tries):
        parts = [[] for _ in range(num_agents)]
        for ix in by_class:
            p = rng.dirichlet(np.full(num_agents, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(ix)).astype(np.int64)
            for a, chunk in enumerate(np.split(rng.permutation(ix), cuts)):
                parts[a].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise DataError(f"partition 'dirichlet': no draw in {max_tries} tries gave every one of "
                    f"{num_agents} agents at least {min_size} samples (alpha={alpha}); "
                    "raise alpha or use fewer agents")


# -- per-agent data --------------------------------------------------------------
def _agree(comm, err):
    """Raise ``err`` on every rank if any rank has one (plain raise without a comm)."""
    if comm is None:
        if err is not None:
            raise err
        return
    from mpidl.comm import CollectiveError
    try:
        comm.agree(None if err is None else str(err))
    except CollectiveError as e:
        raise DataError(str(e)) from None


def load_agent_data(dataset="fashion-mnist", data_dir=None, partition="iid", alpha=0.5, seed=0,
                    rank=0, world_size=1, shards=None, comm=None, path=None, check="auto", **kwargs) -> Shard:
    """Local (Collective when ``comm`` is given). This agent's training data plus the test set.

    With ``shards`` (a path) the rank reads its group of that shard file;
    with ``path`` (``[data] path``: an ``.npz``, an ``.h5`` read lazily, or an
    in-memory set, see :mod:`mpidl.sources`) it partitions that file's labels
    and keeps only its own rows (HDF5: a lazy :class:`~mpidl.sources.Rows`
    view, so ``x`` and ``x_test`` are read batch by batch);
    otherwise it loads ``dataset`` and takes part ``rank`` of
    ``partition(y_train, world_size, partition, seed, alpha)``, the same
    split on every rank.  Pass ``comm`` (a GraphComm) so that a problem seen
    by one rank only (a missing file on one node) is raised on every rank.

    ``check`` (``[data] check``) says how a ``path`` file's inputs are checked
    for NaN/inf here: ``"full"`` scans every row this rank serves (lazy
    sources in blocks), ``"batch"`` and ``"off"`` scan nothing (with
    ``"batch"`` the training loop checks each batch as it is read), ``"auto"``
    is ``"batch"`` for lazy sources (HDF5, ``.npy`` folders) and ``"full"``
    for sources loaded into memory.  Labels are always checked (they are in
    memory).
    """
    err, out = None, None
    try:
        if shards is not None:
            out = read_shard(shards, rank, world_size)
            src = out.attrs.get("dataset")
            if dataset and src and src != dataset:
                log.warning("shard file %s holds %r, not %r: using the shard file", shards, src, dataset)
        elif path:
            out = _file_part(path, partition, alpha, seed, rank, world_size, check)
        else:
            out = _agent_part(dataset, data_dir, partition, alpha, seed, rank, world_size, kwargs)
    except MpidlError as e:
        err = e
    _agree(comm, err)
    return out


def _agent_part(name, data_dir, scheme, alpha, seed, rank, world_size, kwargs):
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside a world of {world_size}")
    if name in ("cifar10", "cifar100") and not kwargs:
        # partition on the labels, normalise only this agent's images (and the test set)
        from mpidl.sources import cifar_float, read_cifar
        u8, y, u8t, yte, mean, std, folder = read_cifar(name, data_dir)
        idx = partition(y, world_size, scheme, seed=seed, alpha=alpha)[rank]
        x, xte, shape, source = cifar_float(u8[idx], mean, std), cifar_float(u8t, mean, std), (3, 32, 32), \
            str(folder)
        ncls, w_true = (10 if name == "cifar10" else 100), None
    elif name in ("fashion-mnist", "mnist") and not kwargs:
        # partition on the labels, convert only this agent's images to float
        arrs, source = _load_idx_raw(name, data_dir)
        y = arrs["y_train"].astype(np.int64)
        idx = partition(y, world_size, scheme, seed=seed, alpha=alpha)[rank]
        yte = arrs["y_test"].astype(np.int64)
        ncls = int(max(y.max(), yte.max())) + 1
        x, xte, shape = _to_float_images(arrs["x_train"][idx]), _to_float_images(arrs["x_test"]), \
            (1,) + arrs["x_train"].shape[1:]
        w_true = None
    else:
        ds = load_dataset(name, data_dir, seed=seed, **kwargs)
        idx = partition(ds.y_train, world_size, scheme, seed=seed, alpha=alpha)[rank]
        x, y, xte, yte, ncls, shape, source = (ds.x_train[idx], ds.y_train, ds.x_test, ds.y_test,
                                               ds.num_classes, ds.input_shape, ds.source)
        w_true = ds.w_true
    attrs = {"dataset": name, "partition": scheme, "seed": seed, "alpha": alpha,
             "num_agents": world_size, "source": source}
    return Shard(x=x, y=y[idx], x_test=xte, y_test=yte, num_classes=ncls, input_shape=tuple(shape),
                 attrs=attrs, rank=rank, world_size=world_size, indices=idx, w_true=w_true)


def check_mode(check: str, lazy: bool) -> str:
    """Local. ``[data] check`` resolved for a source: ``auto`` is ``batch`` for lazy inputs, else ``full``."""
    if check == "auto":
        return "batch" if lazy else "full"
    return check


def _file_part(path, scheme, alpha, seed, rank, world_size, check="auto"):
    """This rank's part of a user's data file or in-memory set (rows of HDF5 / .npy files stay lazy)."""
    from mpidl.sources import check_finite_rows, is_lazy, open_path
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside a world of {world_size}")
    src = open_path(path, check=False)
    mode = check_mode(check, is_lazy(src.x_train))
    if scheme == "given":                        # mpidl.fit(partition="given"): each rank's set is its shard
        idx = np.arange(len(src.y_train))
    else:
        idx = partition(src.y_train, world_size, scheme, seed=seed, alpha=alpha)[rank]
    lazy = is_lazy(src.x_train)
    x = src.x_train.view(idx) if lazy else src.x_train[idx]
    if mode == "full":                           # the rows this rank serves (lazy: read in blocks)
        check_finite_rows(x if lazy else src.x_train, str(path), "x_train")
        check_finite_rows(src.x_test.view(slice(rank, None, world_size)) if lazy else src.x_test, str(path),
                          "x_test")
    attrs = {"dataset": src.name, "partition": scheme, "seed": seed, "alpha": alpha,
             "num_agents": world_size, "source": str(path), "check": mode, **src.provenance}
    return Shard(x=x, y=src.y_train[idx], x_test=src.x_test, y_test=src.y_test, num_classes=src.num_classes,
                 input_shape=tuple(src.input_shape), attrs=attrs, rank=rank, world_size=world_size, indices=idx,
                 block_rows=int(getattr(src.x_train, "block_rows", 0)))
