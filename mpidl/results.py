"""Reading results files (the format :class:`mpidl.metrics.Recorder` writes).

A small reader with no writer behind it: :mod:`mpidl.plots` reads runs
through it, and :mod:`mpidl.metrics` (the writer, which imports plots lazily
for ``report``) re-exports :func:`load_results`; this module imports neither,
so there is no metrics <-> plots import circle.  Layout of a file: see
:mod:`mpidl.metrics`.
"""
from __future__ import annotations

import json
import os

from mpidl.errors import MpidlError
from mpidl.h5state import open_read

__all__ = ["load_results", "ResultsError", "FORMAT", "FORMAT_VERSION"]

FORMAT = "mpidl-results"
FORMAT_VERSION = 1


class ResultsError(MpidlError):
    """A results file that cannot be written or read."""


def _readable(path) -> bool:
    """Local. Whether ``path`` exists and opens as an mpidl results file."""
    if not os.path.exists(path):
        return False
    try:
        with open_read(path) as f:
            return f.attrs.get("format") == FORMAT
    except OSError:
        return False


def _default_label(path):
    """The file's stem, or its folder's name for ``<run>/results.h5``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent if stem == "results" and parent else stem



def load_results(path) -> dict:
    """Local. Read a results file (or a crashed run's ``.tmp``) into plain arrays.

    Returns ``{"path", "label", "config", "attrs", "series": {name: {column: array}}}``.
    """
    import h5py
    path = os.fspath(path)
    if not os.path.exists(path):
        if os.path.exists(path + ".tmp"):
            path = path + ".tmp"
        else:
            raise ResultsError(f"results file {path} not found")
    try:
        with open_read(path) as f:
            if f.attrs.get("format") != FORMAT:
                raise ResultsError(f"{path} is not an mpidl results file")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            series = {name: {c: ds[...] for c, ds in g.items()} for name, g in f.items()
                      if isinstance(g, h5py.Group) and "step" in g}
    except OSError as e:
        raise ResultsError(f"cannot read results file {path}: {e}") from None
    try:
        config = json.loads(attrs.get("config", "{}"))
    except ValueError:
        config = {}
    label = str(attrs.get("label") or _default_label(path.removesuffix(".tmp")))
    return {"path": path, "label": label, "config": config, "attrs": attrs, "series": series}
