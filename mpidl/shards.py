"""HDF5 shard files: one file, one group per agent, plus the test set.

Layout (``format = "mpidl-shards"``, ``format_version = 1``)::

    /                   attrs: format, format_version, dataset, partition, seed, alpha,
                               num_agents, num_classes, input_shape (JSON), source,
                               mpidl_version, created, plus any extra attributes
    /class_histogram    (num_agents, num_classes) int64: samples per agent and class
    /agents/00000/x     float32 (n_i, *input_shape), chunked, shuffle + gzip
    /agents/00000/y     int64 labels (float32 targets for regression)
    /agents/00000/index int64 rows of the source training set
                        group attrs: size, class_histogram
    /test/x, /test/y    the shared test set

A training rank reads only its own group and the test set
(:func:`read_shard`).  :func:`write_shards` writes ``path + ".tmp"`` and
renames it over ``path`` at the end, so an interrupted write never leaves a
half-written file under the final name and never destroys an existing one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from mpidl.errors import MpidlError
from mpidl.h5state import open_read

__all__ = ["Shard", "write_shards", "read_shard", "shard_info", "FORMAT"]

FORMAT = "mpidl-shards"
FORMAT_VERSION = 1


class ShardError(MpidlError, ValueError):
    """A shard file that cannot be used."""


@dataclass
class Shard:
    """Local. One agent's training data plus the shared test set."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple
    attrs: dict = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    indices: np.ndarray | None = None
    w_true: np.ndarray | None = None
    block_rows: int = 0         # rows per block of [data] shuffle = "block" (0: the rows of 1 MiB)

    def __len__(self):
        return len(self.y)


def _hist(y, k):
    if k <= 0 or not np.issubdtype(y.dtype, np.integer):
        return np.zeros(0, dtype=np.int64)
    return np.bincount(y, minlength=k)[:k].astype(np.int64)


def _attr(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    if v is None:
        return "null"
    return v


def write_shards(path, dataset, parts, seed=0, partition="custom", alpha=None, compression=1, **attrs):
    """Local. Write ``dataset``'s training rows ``parts[i]`` as agent i's group, plus the test set.

    ``parts`` must be non-empty, in-range, pairwise disjoint index arrays
    (from :func:`mpidl.data.partition`).  Extra keyword ``attrs`` become
    root attributes (JSON for dicts and lists).  Returns ``path``.
    """
    import h5py
    from mpidl import __version__

    path = os.fspath(path)
    n = len(dataset.y_train)
    parts = [np.asarray(p) for p in parts]
    if not parts:
        raise ShardError("write_shards: no parts given")
    for i, p in enumerate(parts):
        if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
            raise ShardError(f"write_shards: part {i} must be a non-empty 1-D integer index array")
        if p.min() < 0 or p.max() >= n:
            raise ShardError(f"write_shards: part {i} indexes outside the {n} training samples")
    allix = np.concatenate(parts)
    if np.unique(allix).size != allix.size:
        raise ShardError("write_shards: parts overlap; shards must be disjoint")
    k = int(dataset.num_classes)
    hist = np.stack([_hist(dataset.y_train[p], k) for p in parts]) if k > 0 else \
        np.zeros((len(parts), 0), dtype=np.int64)
    comp = dict(compression="gzip", compression_opts=int(compression), shuffle=True) if compression else {}
    tmp = path + ".tmp"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ShardError(f"write_shards: folder {parent} does not exist")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({
                "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": dataset.name,
                "partition": partition, "seed": int(seed), "alpha": float("nan") if alpha is None else float(alpha),
                "num_agents": len(parts), "num_classes": k, "input_shape": json.dumps(list(dataset.input_shape)),
                "source": dataset.source or "", "mpidl_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "num_train": n, "num_test": len(dataset.y_test),
            })
            if dataset.w_true is not None:
                f.create_dataset("w_true", data=dataset.w_true)
            for key, v in attrs.items():
                f.attrs[key] = _attr(v)
            f.create_dataset("class_histogram", data=hist)
            agents = f.create_group("agents")
            for i, p in enumerate(parts):
                g = agents.create_group(f"{i:05d}")
                x = dataset.x_train[p]
                rows = max(1, min(len(p), (1 << 20) // max(1, x[0].nbytes)))
                g.create_dataset("x", data=x, chunks=(rows,) + x.shape[1:], **comp)
                g.create_dataset("y", data=dataset.y_train[p])
                g.create_dataset("index", data=p.astype(np.int64))
                g.attrs["size"] = len(p)
                g.attrs["class_histogram"] = hist[i]
            t = f.create_group("test")
            xt = dataset.x_test
            if len(xt):
                rows = max(1, min(len(xt), (1 << 20) // max(1, xt[0].nbytes)))
                t.create_dataset("x", data=xt, chunks=(rows,) + xt.shape[1:], **comp)
            else:
                t.create_dataset("x", data=xt)
            t.create_dataset("y", data=dataset.y_test)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _open(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ShardError(f"shard file {path} not found; create it with "
                         "`python -m mpidl shard --dataset NAME --agents N --out FILE`")
    try:
        f = open_read(path)
    except OSError as e:
        raise ShardError(f"cannot open shard file {path}: {e} (damaged or not HDF5?)") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise ShardError(f"{path} is not an mpidl shard file (no format={FORMAT!r} attribute)")
    return f


def _root_attrs(f):
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    if "input_shape" in out:
        out["input_shape"] = tuple(json.loads(out["input_shape"]))
    return out


def read_shard(path, rank: int, world_size: int) -> Shard:
    """Local. Read agent ``rank``'s group and the test set from a shard file.

    Raises :class:`ShardError` if the file is missing or damaged, or was
    written for a different number of agents than ``world_size``.
    """
    f = _open(path)
    try:
        attrs = _root_attrs(f)
        n = int(attrs["num_agents"])
        if n != world_size:
            raise ShardError(f"shard file {path} holds {n} agents but the job has {world_size} ranks; "
                             f"start it with mpiexec -n {n} or re-shard with --agents {world_size}")
        if not 0 <= rank < n:
            raise ShardError(f"rank {rank} is outside the {n} agents of {path}")
        try:
            g = f["agents"][f"{rank:05d}"]
            x, y, idx = g["x"][...], g["y"][...], g["index"][...]
            xt, yt = f["test"]["x"][...], f["test"]["y"][...]
            w_true = f["w_true"][...] if "w_true" in f else None
        except (KeyError, OSError) as e:
            raise ShardError(f"shard file {path} is damaged (agent {rank}): {e}") from None
    finally:
        f.close()
    if len(x) != len(y):
        raise ShardError(f"shard file {path} is damaged: agent {rank} has {len(x)} inputs and {len(y)} labels")
    return Shard(x=x, y=y, x_test=xt, y_test=yt, num_classes=int(attrs["num_classes"]),
                 input_shape=tuple(attrs["input_shape"]), attrs=attrs, rank=rank, world_size=n,
                 indices=idx, w_true=w_true)


def shard_info(path) -> dict:
    """Local. Root attributes plus per-agent ``sizes`` and ``class_histogram`` (no data read)."""
    f = _open(path)
    try:
        attrs = _root_attrs(f)
        sizes = [int(f["agents"][k].attrs["size"]) for k in sorted(f["agents"])]
        hist = f["class_histogram"][...]
        test = int(f["test"]["y"].shape[0])
    except (KeyError, OSError) as e:
        raise ShardError(f"shard file {path} is damaged: {e}") from None
    finally:
        f.close()
    return {"attrs": attrs, "sizes": sizes, "class_histogram": hist, "test_size": test}
