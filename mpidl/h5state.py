"""Nested state dicts <-> HDF5 groups, bit-exact and type-preserving (used by :mod:`mpidl.checkpoint`).

Values: NumPy arrays (numbers and booleans) and scalars, Python ``int`` (any
size: beyond int64 it is stored as text), ``float``, ``bool``, ``str``,
``bytes``, ``None``, JSON-able lists and tuples, CPU torch tensors, and
nested dicts of these (HDF5 groups, insertion order kept).  Each dataset
carries a ``pytype`` attribute so :func:`read_tree` returns the same types.
"""
from __future__ import annotations

import json

import numpy as np

__all__ = ["write_tree", "read_tree", "read_path", "compare_like"]

_INT64 = (-(1 << 63), (1 << 63) - 1)


def write_tree(group, d, prefix=""):
    """Local. Write dict ``d`` into HDF5 ``group`` (sub-dicts become sub-groups); TypeError on bad values."""
    if not isinstance(d, dict):
        raise TypeError(f"checkpoint state{' ' + prefix if prefix else ''} must be a dict, got {type(d).__name__}")
    for k, v in d.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if not isinstance(k, str) or not k or "/" in k or k == ".":
            raise TypeError(f"checkpoint state key {name!r}: keys must be non-empty str without '/'")
        if isinstance(v, dict):
            write_tree(group.create_group(k, track_order=True), v, name)
            continue
        pytype, data, extra = _encode(v, name)
        ds = group.create_dataset(k, data=data)
        ds.attrs["pytype"] = pytype
        for ek, ev in extra.items():
            ds.attrs[ek] = ev


def _encode(v, name):
    import h5py
    mod = type(v).__module__
    if mod.startswith("torch"):
        t = v.detach().cpu()
        try:
            a = t.numpy()
        except TypeError as e:
            raise TypeError(f"checkpoint state {name!r}: torch dtype {t.dtype} has no NumPy twin ({e})") from None
        return "torch", a, {}
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biufc":
            raise TypeError(f"checkpoint state {name!r}: arrays of dtype {v.dtype} cannot be saved "
                            "(numbers and booleans only)")
        return "ndarray", v, {}
    if isinstance(v, np.generic):
        if v.dtype.kind not in "biufc":
            raise TypeError(f"checkpoint state {name!r}: NumPy scalar of dtype {v.dtype} cannot be saved")
        return "npscalar", np.asarray(v), {}
    if v is None:
        return "none", h5py.Empty("i1"), {}
    if isinstance(v, bool):
        return "bool", np.int8(v), {}
    if isinstance(v, int):
        if _INT64[0] <= v <= _INT64[1]:
            return "int", np.int64(v), {}
        return "bigint", np.array(str(v), dtype=h5py.string_dtype()), {}
    if isinstance(v, float):
        return "float", np.float64(v), {}
    if isinstance(v, str):
        return "str", np.array(v, dtype=h5py.string_dtype()), {}
    if isinstance(v, (bytes, bytearray)):
        return "bytes", np.frombuffer(bytes(v), dtype=np.uint8), {}
    if isinstance(v, (list, tuple)):
        try:
            s = json.dumps(v, allow_nan=True)
        except (TypeError, ValueError):
            raise TypeError(f"checkpoint state {name!r}: lists and tuples must be JSON-able; "
                            "use a NumPy array for numbers") from None
        return ("tuple" if isinstance(v, tuple) else "list"), np.array(s, dtype=h5py.string_dtype()), {}
    raise TypeError(f"checkpoint state {name!r} has type {type(v).__name__}; use arrays, scalars, str or dicts")


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def read_tree(group, into=None):
    """Local. The dict :func:`write_tree` wrote, with the original Python and NumPy types.

    ``into`` (a dict shaped like the result): an array dataset whose name, shape and dtype match a
    writeable C-contiguous NumPy array of ``into`` is read straight into that array, which the
    result then holds, so a resume does not hold a second copy of a large state.
    """
    import h5py
    out = {}
    for k, obj in group.items():
        dest = into.get(k) if isinstance(into, dict) else None
        out[k] = read_tree(obj, dest) if isinstance(obj, h5py.Group) else _read_dataset(obj, dest)
    return out


def read_path(group, path: str):
    """Local. One entry of what :func:`write_tree` wrote under ``group``: ``"algo/x"`` reads only
    that array, ``"algo"`` that sub-dict (KeyError when absent)."""
    import h5py
    obj = group[path]
    return read_tree(obj) if isinstance(obj, h5py.Group) else _read_dataset(obj)


def _read_dataset(obj, dest=None):
    t = obj.attrs.get("pytype", "ndarray")
    if isinstance(t, bytes):
        t = t.decode()
    if t == "none":
        return None
    if t == "str":
        return obj.asstr()[()]
    if t == "bigint":
        return int(obj.asstr()[()])
    if t == "list":
        return json.loads(obj.asstr()[()])
    if t == "tuple":
        return _tuplify(json.loads(obj.asstr()[()]))
    if t == "bytes":
        return obj[()].tobytes()
    if t == "bool":
        return bool(obj[()])
    if t == "int":
        return int(obj[()])
    if t == "float":
        return float(obj[()])
    if t == "npscalar":
        return obj[()]
    if t == "torch":
        import torch
        return torch.from_numpy(np.asarray(obj[()]))
    if (isinstance(dest, np.ndarray) and dest.shape == obj.shape and dest.dtype == obj.dtype
            and dest.flags.c_contiguous and dest.flags.writeable):
        if dest.size:
            obj.read_direct(dest)
        return dest
    return np.asarray(obj[()])


def compare_like(state, like, prefix=""):
    """Local. Describe the first name/shape/dtype/type mismatch of ``state`` against ``like`` (None: fits)."""
    where = prefix or "state"
    if not isinstance(state, dict):
        return f"{where} is a {type(state).__name__}, expected a dict"
    missing = [k for k in like if k not in state]
    extra = [k for k in state if k not in like]
    if missing:
        return f"{where} lacks {missing}"
    if extra:
        return f"{where} has entries {extra} this run does not expect"
    for k, want in like.items():
        got, name = state[k], f"{prefix}/{k}" if prefix else k
        if isinstance(want, dict):
            msg = compare_like(got, want, name)
            if msg:
                return msg
            continue
        if type(want).__module__.startswith("torch"):
            want = want.detach().cpu().numpy()
            got = got.numpy() if type(got).__module__.startswith("torch") else got
        if isinstance(want, (np.ndarray, np.generic)):
            if not isinstance(got, (np.ndarray, np.generic)):
                return f"{name} is a {type(got).__name__}, expected an array"
            if got.shape != want.shape or got.dtype != want.dtype:
                return f"{name} has shape {got.shape} {got.dtype}, this run has {want.shape} {want.dtype}"
        elif want is not None and got is not None and not isinstance(got, type(want)) \
                and not (isinstance(want, float) and isinstance(got, int)):
            return f"{name} is a {type(got).__name__}, this run has a {type(want).__name__}"
    return None


def open_read(path):
    """Local. Open an HDF5 file read-only without file locking.

    Many ranks read the same shard or checkpoint file at once, often on
    cluster file systems without ``flock`` support, where HDF5's default
    locking fails ("unable to lock file").  Readers never need the lock.
    Falls back to HDF5's default with an HDF5 too old for the option.
    """
    import h5py
    try:
        return h5py.File(path, "r", locking=False)
    except (TypeError, ValueError) as e:
        if "locking" not in str(e):
            raise
        return h5py.File(path, "r")
