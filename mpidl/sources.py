"""Users' data: array files (``.npz``), HDF5 read lazily, CIFAR-10/100 folders, in-memory arrays.

One contract for every source (:class:`ArrayData`): labels/targets in memory
(the partition schemes need them), inputs as something a consumer indexes by
rows: a NumPy array, or a :class:`Rows` view of an HDF5 dataset that reads
only the rows asked for.  A rank therefore holds its batch, its evaluation
slices and the HDF5 chunk cache, never the whole training set.

``[data] path`` names a file (``.npz``, ``.h5``/``.hdf5``), a folder of
``.npy`` files (``x_train.npy, y_train.npy, x_test.npy, y_test.npy``, inputs
memory-mapped: :class:`MappedRows`) or, from Python, an in-memory set
registered with :func:`register_arrays` (``memory:<key>``).
Every kind holds four arrays: ``x_train, y_train, x_test, y_test``
(integer ``y``: classification with ``num_classes = max label + 1``, or the
optional scalar ``num_classes`` key / HDF5 root attribute; float ``y``:
regression).  ``x`` may have any trailing shape (vectors, ``N, C, H, W``
images); it is used as float32.

CIFAR-10/100 (:func:`read_cifar`) read the python-version folders of
https://www.cs.toronto.edu/~kriz/cifar.html: pickled dicts with ``b'data'``
(uint8, N x 3072, channel-major) and ``b'labels'`` (CIFAR-10) or
``b'fine_labels'`` (CIFAR-100); images are normalised per channel with the
training set's mean and standard deviation.

This module imports NumPy and (lazily) h5py only, never torch.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpidl.errors import MpidlError

__all__ = ["ArrayData", "Rows", "MappedRows", "is_lazy", "open_path", "first_bad_row", "read_cifar",
           "register_arrays", "unregister_arrays",
           "fingerprint", "augment_batch", "SourceError", "CIFAR"]

KEYS = ("x_train", "y_train", "x_test", "y_test")
_CHECK_ROWS = 4096          # rows per read when a lazy source is scanned for NaN/inf
_DENSE = 4                  # a read whose rows fill >= 1/_DENSE of their span reads the span in one slab
NPY_FILES = tuple(f"{k}.npy" for k in KEYS)


class SourceError(MpidlError, ValueError):
    """A data file or in-memory set that cannot be used."""


class _LazyRows:
    """What the lazy row sources share: a view is ``index`` (row numbers in the file); ``x[i]``,
    ``x[array]`` read rows, ``x[slice]`` is a narrower view. Subclasses give ``view`` and ``read``."""

    index: np.ndarray

    def __len__(self):
        return len(self.index)

    def file_rows(self, pos) -> np.ndarray:
        """Local. Row numbers in the file of positions ``pos`` of this view."""
        return self.index[np.asarray(pos, dtype=np.int64)]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.view(key)
        if isinstance(key, (int, np.integer)):
            return self.read(np.array([key]))[0]
        return self.read(np.asarray(key))


class Rows(_LazyRows):
    """Local. A view of some rows of a 2+-D HDF5 dataset, read on demand as float32.

    ``rows[int array]`` reads those rows (any order, repeats allowed) and
    returns an ndarray; ``rows[slice]`` returns a narrower view without
    reading; ``np.asarray(rows)`` reads the whole view.  The file is opened
    once per process (read-only, with a chunk cache of ``cache_bytes``).
    """

    def __init__(self, path, name, index=None, *, cache_bytes: int = 4 << 20, _file=None, _raw=None):
        self.path, self.name = os.fspath(path), name
        self._f = _file if _file is not None else _h5_open(self.path, cache_bytes)
        dset = self._f[name]
        self._dset = dset
        self.index = np.arange(dset.shape[0], dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self.shape = (len(self.index),) + tuple(dset.shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)
        self.filtered = _filtered(dset)
        self.block_rows = int(dset.chunks[0]) if dset.chunks else _mib_rows(self.shape)
        # rows read straight from the file when the layout allows (shared by the views; False: h5py reads)
        self._raw = (_RawRows.of(self.path, dset) or False) if _raw is None else _raw

    def view(self, index) -> "Rows":
        """Local. The rows ``index`` (positions in this view) as a new lazy view."""
        return Rows(self.path, self.name, self.index[index], _file=self._f, _raw=self._raw)

    def read(self, pos) -> np.ndarray:
        """Local. Rows at positions ``pos`` of this view, in that order (float32 ndarray)."""
        rows = self.index[np.asarray(pos, dtype=np.int64)]
        if rows.size == 0:
            return np.empty((0,) + self.shape[1:], np.float32)
        uniq, inv = np.unique(rows, return_inverse=True)   # h5py wants increasing, distinct indices
        if self._raw:                                       # rows straight from the file (no GIL held)
            return np.asarray(self._raw.read(uniq), dtype=np.float32)[inv.reshape(-1)]
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo == len(uniq):                            # one contiguous block: a hyperslab read
            block = self._dset[lo:hi]
        elif hi - lo <= _DENSE * len(uniq):                 # dense: one slab, then pick the rows
            block = self._dset[lo:hi][uniq - lo]
        elif not self.filtered:
            # scattered rows of an unfiltered dataset: one simple read per row (h5py's fast path,
            # a few microseconds each, with the chunk cache off), far cheaper than a point selection
            block = np.empty((len(uniq),) + tuple(self._dset.shape[1:]), self._dset.dtype)
            d = self._dset
            for i, r in enumerate(uniq.tolist()):
                block[i] = d[r]
        else:                                               # compressed chunks: one selection, cached chunks
            block = self._dset[uniq]
        return np.asarray(block, dtype=np.float32)[inv.reshape(-1)]

    def __array__(self, dtype=None, copy=None):
        out = self.read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self):
        return f"Rows({self.path}:{self.name}, {len(self)} of {self._dset.shape[0]} rows)"


class MappedRows(_LazyRows):
    """Local. A view of some rows of a memory-mapped ``.npy`` array, read on demand as float32.

    The same interface as :class:`Rows`: ``rows[int array]`` reads those rows,
    ``rows[slice]`` is a narrower view, ``np.asarray(rows)`` reads the view.
    Nothing is loaded at open; a C-ordered array's rows are read with
    ``os.preadv`` at their offsets (as :class:`Rows` reads uncompressed HDF5),
    others through the map.  Either way the array may be larger than memory.
    """

    def __init__(self, path, name, index=None, *, _array=None, _raw=None):
        self.path, self.name = os.fspath(path), name
        self._a = _array if _array is not None else _npy_map(self.path)
        self.index = np.arange(self._a.shape[0], dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self.shape = (len(self.index),) + tuple(self._a.shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)
        self.filtered = False
        self.block_rows = _mib_rows(self.shape)
        if _raw is None:     # a C-ordered map: rows read with preadv at their offsets (no page faults, no GIL)
            a = self._a
            ok = isinstance(a, np.memmap) and a.flags.c_contiguous and a.dtype.kind in "biuf" and a.shape[0] > 0 \
                and hasattr(os, "preadv")
            _raw = _RawRows(self.path, a.dtype, a.shape, base=int(a.offset)) if ok else False
        self._raw = _raw

    def view(self, index) -> "MappedRows":
        """Local. The rows ``index`` (positions in this view) as a new lazy view."""
        return MappedRows(self.path, self.name, self.index[index], _array=self._a, _raw=self._raw)

    def read(self, pos) -> np.ndarray:
        """Local. Rows at positions ``pos`` of this view, in that order (float32 ndarray)."""
        rows = self.index[np.asarray(pos, dtype=np.int64)]
        if rows.size == 0:
            return np.empty((0,) + self.shape[1:], np.float32)
        if self._raw:
            uniq, inv = np.unique(rows, return_inverse=True)
            return np.asarray(self._raw.read(uniq), dtype=np.float32)[inv.reshape(-1)]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo == rows.size and np.all(np.diff(rows) == 1):
            return np.array(self._a[lo:hi], dtype=np.float32)
        return np.asarray(self._a[rows], dtype=np.float32)

    def __array__(self, dtype=None, copy=None):
        out = self.read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self):
        return f"MappedRows({self.path}, {len(self)} of {self._a.shape[0]} rows)"


class _RawRows:
    """Local. Rows of an uncompressed HDF5 dataset read with ``os.preadv`` at their byte offsets.

    An unfiltered dataset stores each row's bytes contiguously in the file: at
    ``offset + row * rowbytes`` (contiguous layout), or inside its chunk when
    the chunks span whole rows.  The chunks' file offsets come from HDF5's
    chunk index once, at open; every later read is one ``preadv`` per run of
    adjacent rows: no h5py call, and the GIL is released during the read, so a
    reader thread does not hold up the training step.  The bytes are the ones
    h5py would return.  :meth:`of` gives None for any other layout (then h5py
    reads the rows).
    """

    def __init__(self, path, dtype, shape, base=None, chunk_rows=0, chunk_addr=None):
        self.fd = os.open(path, os.O_RDONLY)
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)
        self.rowbytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self.base, self.B, self.addr = base, int(chunk_rows), chunk_addr

    @classmethod
    def of(cls, path, dset):
        if not hasattr(os, "preadv"):                # not every platform has it: h5py reads
            return None
        try:
            if _filtered(dset) or dset.dtype.hasobject or dset.dtype.kind not in "biuf" or dset.ndim < 1 \
                    or dset.shape[0] == 0 or getattr(dset, "is_virtual", False) or dset.external:
                return None
            if dset.chunks is None:
                off = dset.id.get_offset()
                return None if off is None else cls(path, dset.dtype, dset.shape, base=int(off))
            if tuple(dset.chunks[1:]) != tuple(dset.shape[1:]):
                return None                          # a row spans several chunks
            B = int(dset.chunks[0])
            nch = -(-dset.shape[0] // B)
            if dset.id.get_num_chunks() != nch:      # unwritten chunks hold the fill value: h5py knows it
                return None
            addr = np.empty(nch, np.int64)
            for i in range(nch):
                info = dset.id.get_chunk_info(i)
                addr[info.chunk_offset[0] // B] = info.byte_offset
            return cls(path, dset.dtype, dset.shape, chunk_rows=B, chunk_addr=addr)
        except Exception:      # noqa: BLE001  (an HDF5 library without the chunk queries: h5py reads)
            return None

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError, TypeError):
            pass

    def offsets(self, rows: np.ndarray) -> np.ndarray:
        if self.addr is None:
            return self.base + rows * self.rowbytes
        return self.addr[rows // self.B] + (rows % self.B) * self.rowbytes

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Local. The increasing, distinct ``rows``, in the dataset's dtype and shape."""
        rb = self.rowbytes
        out = np.empty((len(rows), rb), np.uint8)
        offs = self.offsets(rows)
        cuts = np.flatnonzero(np.diff(offs) != rb) + 1        # runs of rows adjacent in the file
        starts = np.concatenate([[0], cuts]).tolist()
        ends = np.concatenate([cuts, [len(rows)]]).tolist()
        flat = memoryview(out.reshape(-1))
        for a, b in zip(starts, ends):
            n = os.preadv(self.fd, [flat[a * rb:b * rb]], int(offs[a]))
            if n != (b - a) * rb:
                raise OSError(f"short read: {n} of {(b - a) * rb} bytes at offset {int(offs[a])} (truncated file?)")
        return out.view(self.dtype).reshape((len(rows),) + self.shape[1:])


def is_lazy(x) -> bool:
    """Local. True for inputs read on demand (:class:`Rows`, :class:`MappedRows`)."""
    return isinstance(x, (Rows, MappedRows))


def _filtered(dset) -> bool:
    """Whether an HDF5 dataset's chunks pass through filters (compression, shuffle, checksums)."""
    try:
        return dset.id.get_create_plist().get_nfilters() > 0
    except Exception:      # noqa: BLE001  (an unusual dataset: assume the general path)
        return True


def _mib_rows(shape) -> int:
    """Rows of ``shape``'s trailing size (float32) in 1 MiB: the block of an unchunked source."""
    row = 4 * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 4
    return max(1, (1 << 20) // max(1, row))


def _npy_map(path):
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SourceError(f"cannot read {path}: {e}") from None
    if not isinstance(a, np.ndarray):
        raise SourceError(f"{path} does not hold one array")
    return a


def first_bad_row(x) -> int:
    """Local. Position of the first row of the batch ``x`` (ndarray or CPU tensor) holding NaN/inf, or -1.

    One float64 sum first: NaN and inf propagate into it, and finite float32 values cannot
    overflow it, so a finite sum clears the batch at the cost of one pass; only a batch whose
    sum is not finite is scanned row by row.
    """
    a = x.detach().numpy() if type(x).__module__.startswith("torch") else np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):
        if len(a) == 0 or np.isfinite(a.sum(dtype=np.float64)):
            return -1
    ok = np.isfinite(a.reshape(len(a), -1)).all(1)
    return -1 if ok.all() else int(np.flatnonzero(~ok)[0])


@dataclass
class ArrayData:
    """Local. A data set from a user's source; ``x_*`` are ndarrays or :class:`Rows`."""

    name: str
    x_train: object
    y_train: np.ndarray
    x_test: object
    y_test: np.ndarray
    num_classes: int            # 0 = regression
    input_shape: tuple
    provenance: dict = field(default_factory=dict)


# -- in-memory sets (the Python API) -------------------------------------------
_MEMORY: dict = {}
_MEMORY_LOCK = threading.Lock()


def register_arrays(x_train, y_train, x_test, y_test, num_classes: int | None = None) -> str:
    """Local. Register in-memory arrays as a data source; returns the ``[data] path`` value.

    The value, ``memory:<key>``, is valid in this process only; the key is
    a hash of the arrays, so every rank that registers the same arrays gets
    the same value (and the same config).
    """
    arrs = [np.asarray(a) for a in (x_train, y_train, x_test, y_test)]
    h = hashlib.sha256()
    for a in arrs:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1)[: 1 << 20].tobytes())
    key = h.hexdigest()[:16]
    with _MEMORY_LOCK:
        _MEMORY[key] = (arrs, num_classes)
    return f"memory:{key}"


def unregister_arrays(path: str) -> None:
    """Local. Forget a set registered with :func:`register_arrays`."""
    with _MEMORY_LOCK:
        _MEMORY.pop(path.split(":", 1)[1], None)


# -- opening a path ------------------------------------------------------------
def _h5_open(path, cache_bytes=4 << 20):
    import h5py
    try:
        return h5py.File(path, "r", rdcc_nbytes=int(cache_bytes))
    except OSError as e:
        raise SourceError(f"cannot read HDF5 file {path}: {e}") from None


def fingerprint(path) -> dict:
    """Local. ``{"data_file", "data_bytes", "data_sha256_head"}``: path, size and the SHA-256 of
    the first MiB (header plus first chunk), recorded with results and checkpoints."""
    p = os.fspath(path)
    if p.startswith("memory:"):
        return {"data_file": p}
    files = [os.path.join(p, f) for f in NPY_FILES] if os.path.isdir(p) else [p]
    try:
        size, h = 0, hashlib.sha256()
        for q in files:       # a folder: the four .npy files in a fixed order, the first MiB of each
            size += os.path.getsize(q)
            with open(q, "rb") as f:
                h.update(f.read(1 << 20))
        head = h.hexdigest()
    except OSError as e:
        raise SourceError(f"cannot read data file {p}: {e}") from None
    return {"data_file": os.path.abspath(p), "data_bytes": int(size), "data_sha256_head": head}


def open_path(path, *, check: bool = True) -> ArrayData:
    """Local. Open ``[data] path``: ``.npz``, ``.h5``/``.hdf5``/``.hdf`` or ``memory:<key>``.

    ``check`` validates the labels and that the (in-memory) inputs are finite;
    lazy HDF5 inputs are scanned by :func:`check_finite_rows` on the rows a
    rank serves.
    """
    p = os.fspath(path)
    if p.startswith("memory:"):
        with _MEMORY_LOCK:
            entry = _MEMORY.get(p.split(":", 1)[1])
        if entry is None:
            raise SourceError(f"data path {p!r}: no such in-memory set in this process "
                              "(register it with mpidl.sources.register_arrays on every rank)")
        arrs, ncls = entry
        return _validate(p, dict(zip(KEYS, arrs)), ncls, p, check, {"data_file": p})
    if not os.path.exists(p):
        raise SourceError(f"data file {p} not found")
    if os.path.isdir(p):
        return _open_npy_dir(p, check)
    ext = Path(p).suffix.lower()
    if ext == ".npz":
        return _open_npz(p, check)
    if ext in (".h5", ".hdf5", ".hdf"):
        return _open_h5(p, check)
    raise SourceError(f"data file {p}: unknown kind {ext!r}; use .npz (numpy.savez), .h5 (HDF5) or a folder "
                      f"of .npy files, holding {', '.join(KEYS)}")


def _open_npz(p, check):
    try:
        with np.load(p, allow_pickle=False) as z:
            names = set(z.files)
            missing = [k for k in KEYS if k not in names]
            if missing:
                raise SourceError(f"data file {p} has no array {missing[0]!r} (it holds "
                                  f"{', '.join(sorted(names)) or 'nothing'}; needs {', '.join(KEYS)})")
            arrs = {k: z[k] for k in KEYS}
            ncls = int(z["num_classes"]) if "num_classes" in names else None
    except SourceError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise SourceError(f"cannot read data file {p}: {e}") from None
    return _validate(p, arrs, ncls, Path(p).stem, check, fingerprint(p))


def missing_npy(folder) -> list:
    """Local. The files of :data:`NPY_FILES` that ``folder`` lacks."""
    return [f for f in NPY_FILES if not os.path.isfile(os.path.join(folder, f))]


def _open_npy_dir(p, check):
    missing = missing_npy(p)
    if missing:
        held = ", ".join(sorted(f for f in os.listdir(p) if f.endswith(".npy"))) or "no .npy file"
        raise SourceError(f"data folder {p} has no {missing[0]} (it holds {held}; needs {', '.join(NPY_FILES)})")
    arrs = {}
    for k in KEYS:
        a = _npy_map(os.path.join(p, f"{k}.npy"))
        if k.startswith("x") and a.ndim >= 2 and (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            arrs[k] = MappedRows(os.path.join(p, f"{k}.npy"), k, _array=a)
        else:                    # labels in memory (the partition needs them); odd inputs fail in _validate
            arrs[k] = np.array(a)
    return _validate(p, arrs, None, Path(p).name, check, fingerprint(p))


def _open_h5(p, check):
    f = _h5_open(p)
    missing = [k for k in KEYS if k not in f]
    if missing:
        names = ", ".join(sorted(f.keys())) or "nothing"
        f.close()
        raise SourceError(f"data file {p} has no dataset {missing[0]!r} (it holds {names}; "
                          f"needs {', '.join(KEYS)})")
    if not any(_filtered(f[k]) for k in ("x_train", "x_test")):
        # no compression: the chunk cache only slows scattered row reads (every row pulled a whole
        # chunk through it), so read without one
        f.close()
        f = _h5_open(p, 0)
    try:
        ys = {k: f[k][...] for k in ("y_train", "y_test")}
        ncls = int(f.attrs["num_classes"]) if "num_classes" in f.attrs else None
    except OSError as e:
        raise SourceError(f"cannot read data file {p}: {e}") from None
    arrs = {"x_train": Rows(p, "x_train", _file=f), "x_test": Rows(p, "x_test", _file=f), **ys}
    return _validate(p, arrs, ncls, Path(p).stem, check, fingerprint(p))


def _validate(where, a, ncls, name, check, prov) -> ArrayData:
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if len(x.shape) < 2:
            raise SourceError(f"{where}: x_{split} must have one row per sample (N, ...), got shape {tuple(x.shape)}")
        if y.ndim not in (1, 2):
            raise SourceError(f"{where}: y_{split} must be 1-D labels/targets (or N x d targets), "
                              f"got shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise SourceError(f"{where}: x_{split} has {x.shape[0]} rows but y_{split} has {y.shape[0]}")
        if x.shape[0] == 0:
            raise SourceError(f"{where}: the {split} set is empty")
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
            raise SourceError(f"{where}: y_{split} has dtype {y.dtype}, not numbers")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise SourceError(f"{where}: x_train rows have shape {a['x_train'].shape[1:]} but x_test rows "
                          f"{a['x_test'].shape[1:]}")
    ytr, yte = a["y_train"], a["y_test"]
    classify = np.issubdtype(ytr.dtype, np.integer) or ytr.dtype == bool
    if classify != (np.issubdtype(yte.dtype, np.integer) or yte.dtype == bool):
        raise SourceError(f"{where}: y_train is {ytr.dtype} but y_test is {yte.dtype}; use integer labels "
                          "in both (classification) or floats in both (regression)")
    if classify:
        if ytr.ndim != 1 or yte.ndim != 1:
            raise SourceError(f"{where}: class labels must be 1-D")
        ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
        lo = min(int(ytr.min()), int(yte.min()))
        hi = max(int(ytr.max()), int(yte.max()))
        k = hi + 1 if ncls is None else int(ncls)
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            split, y = ("train", ytr) if bad in (int(ytr.min()), int(ytr.max())) else ("test", yte)
            row = int(np.flatnonzero(y == bad)[0])
            raise SourceError(f"{where}: label {bad} (y_{split} row {row}) is outside 0..{k - 1}"
                              + (f" (num_classes = {k})" if ncls is not None else ""))
        if k < 2:
            raise SourceError(f"{where}: classification needs at least 2 classes, the labels give {k}")
    else:
        ytr, yte = ytr.astype(np.float32), yte.astype(np.float32)
        k = 0
        for split, y in (("train", ytr), ("test", yte)):
            if not np.all(np.isfinite(y)):
                raise SourceError(f"{where}: y_{split} holds NaN or inf")
    xs = {}
    for split in ("train", "test"):
        x = a[f"x_{split}"]
        if not is_lazy(x):
            if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
                raise SourceError(f"{where}: x_{split} has dtype {x.dtype}, not numbers")
            x = np.asarray(x, dtype=np.float32)
            if check and (bad := first_bad_row(x)) >= 0:
                raise SourceError(f"{where}: x_{split} row {bad} holds NaN or inf")
        xs[split] = x
    return ArrayData(name=str(name), x_train=xs["train"], y_train=ytr, x_test=xs["test"], y_test=yte,
                     num_classes=k, input_shape=tuple(int(s) for s in a["x_train"].shape[1:]), provenance=prov)


def check_finite_rows(x, where: str, what: str) -> None:
    """Local. Raise :class:`SourceError` when the rows of ``x`` (ndarray or :class:`Rows`) hold NaN/inf.

    Lazy rows are read in blocks of a few thousand, so memory stays bounded.  The message names
    the first bad row (its row number in the file for lazy rows).
    """
    n = len(x)
    for a in range(0, n, _CHECK_ROWS):
        pos = np.arange(a, min(n, a + _CHECK_ROWS))
        block = x.read(pos) if is_lazy(x) else x[a:a + _CHECK_ROWS]
        bad = first_bad_row(block)
        if bad >= 0:
            row = int(x.file_rows(pos[bad:bad + 1])[0]) if is_lazy(x) else a + bad
            raise SourceError(f"{where}: {what} row {row} holds NaN or inf")


# -- CIFAR ---------------------------------------------------------------------
CIFAR = {
    "cifar10": {"folders": ("cifar-10-batches-py", "cifar10", "cifar-10"),
                "train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",),
                "label": b"labels", "classes": 10,
                "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"},
    "cifar100": {"folders": ("cifar-100-python", "cifar100", "cifar-100"),
                 "train": ("train",), "test": ("test",), "label": b"fine_labels", "classes": 100,
                 "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"},
}


def _cifar_folder(name, data_dir):
    spec = CIFAR[name]
    base = data_dir or os.environ.get("MPIDL_DATA") or "/usr/share/datasets"
    cands = [Path(base) / f for f in spec["folders"]] + [Path(base)]
    need = spec["train"] + spec["test"]
    for d in cands:
        if all((d / f).is_file() for f in need):
            return d
    files = ", ".join(need)
    raise SourceError(f"{name}: the files {files} were not found in any of "
                      f"{', '.join(str(c) for c in cands)}. mpidl downloads nothing: fetch {spec['url']}, "
                      f"unpack it (tar xzf) into a folder DIR so that DIR/{spec['folders'][0]}/{need[0]} "
                      f"exists, then set [data] data_dir = \"DIR\" or MPIDL_DATA=DIR")


def _read_cifar_file(path, label_key):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e} (expected a pickled dict "
                          f"with b'data' (uint8, N x 3072) and {label_key!r})") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise SourceError(f"CIFAR file {path}: b'data' has shape {x.shape} and the labels {y.shape}; "
                          "expected N x 3072 and N")
    return x, y


def read_cifar(name: str, data_dir=None):
    """Local. ``(u8_train, y_train, u8_test, y_test, mean, std, folder)`` of CIFAR-10/100.

    Images are uint8 ``N x 3 x 32 x 32``; ``mean``/``std`` are the per-channel
    statistics of the training images in [0, 1] (float32, shape ``(3,)``).
    """
    spec = CIFAR[name]
    folder = _cifar_folder(name, data_dir)
    parts = {}
    for split in ("train", "test"):
        xs, ys = zip(*(_read_cifar_file(folder / f, spec["label"]) for f in spec[split]))
        parts[split] = (np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys))
    ytr, yte = parts["train"][1], parts["test"][1]
    k = spec["classes"]
    for y, split in ((ytr, "train"), (yte, "test")):
        if y.size and (y.min() < 0 or y.max() >= k):
            raise SourceError(f"{name}: a {split} label lies outside 0..{k - 1} in {folder}")
    u8 = parts["train"][0]
    s1 = np.zeros(3)
    s2 = np.zeros(3)
    for a in range(0, len(u8), 5000):       # bounded float64 temporaries
        blk = u8[a:a + 5000].astype(np.float64) / 255.0
        s1 += blk.sum(axis=(0, 2, 3))
        s2 += (blk ** 2).sum(axis=(0, 2, 3))
    m = len(u8) * 32 * 32
    mean = s1 / m
    std = np.sqrt(np.maximum(s2 / m - mean ** 2, 1e-12))
    return u8, ytr, parts["test"][0], yte, mean.astype(np.float32), std.astype(np.float32), folder


def cifar_float(u8, mean, std) -> np.ndarray:
    """Local. uint8 N x 3 x 32 x 32 -> float32 normalised per channel: (x / 255 - mean) / std."""
    x = u8.astype(np.float32)
    x /= np.float32(255.0)
    x -= mean.reshape(1, 3, 1, 1)
    x /= std.reshape(1, 3, 1, 1)
    return x


# -- augmentation ----------------------------------------------------------------
def augment_batch(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Local. Random crop (zero padding ``pad``) and horizontal flip of an N x C x H x W batch.

    Draws, in this order, the N row offsets, the N column offsets (each
    uniform in 0..2*pad) and the N flip bits from ``rng``; the same ``rng``
    state gives the same batch.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise SourceError(f"augment needs image batches N x C x H x W, got shape {x.shape}")
    n, _, h, w = x.shape
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flip = rng.integers(0, 2, n).astype(bool)
    padded = np.zeros((n, x.shape[1], h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out
