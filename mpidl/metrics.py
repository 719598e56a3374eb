"""Run results: the rank-0 results file, consensus error, progress display.

Results file (HDF5, ``format = "mpidl-results"``), written by rank 0 only::

    /                  attrs: format, format_version, config (JSON), label, world_size,
                              mpidl_version, created, resumes (JSON list),
                              events (JSON list of {kind, step, ...}: a resize's from/to ranks)
    /<series>/step     int64 (rows,)        one group per series, e.g. "train", "eval"
    /<series>/<name>   float64 (rows,)      one column per logged scalar (NaN where absent)
    /<series>/<name>   float64 (rows, k)    a logged 1-D array, e.g. per-agent accuracy

Every series has a ``wall_time`` column (seconds since the run started,
continued across resumes) unless the caller logs its own.  The file is
written as ``path + ".tmp"``, flushed every ``flush_every`` rows or
``flush_seconds`` seconds (so a crash leaves a readable ``.tmp``), and renamed
to ``path`` by :meth:`Recorder.close`.  :meth:`Recorder.sync` (called before
each checkpoint is declared complete) also fsyncs it, so a crash loses no row
up to the newest checkpoint; a resume continues from the ``.tmp`` a crashed
run left (or from ``path``), drops the rows after the checkpoint and continues
the wall time from the moment of the checkpoint.

Consensus error (the disagreement between agents, ALGORITHMS.md section 0)::

    consensus_error = sqrt( (1/N) sum_i || x_i - xbar ||^2 ),   xbar = (1/N) sum_i x_i

Plots and the summary table: :func:`report` (:mod:`mpidl.plots`), which reads files through
:mod:`mpidl.results` (the reader; re-exported here as :func:`load_results`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time

import numpy as np

from mpidl.checkpoint import _uncounted
from mpidl.errors import MpidlError
from mpidl.h5state import open_read
from mpidl.results import FORMAT, FORMAT_VERSION, ResultsError, _default_label, _readable, load_results  # noqa: F401

__all__ = ["Recorder", "consensus_error", "Progress", "load_results", "report", "ResultsError"]

log = logging.getLogger("mpidl.metrics")
progress_log = logging.getLogger("mpidl.progress")

_RESERVED = ("step",)


def _agree(comm, err):
    if comm is None:
        if err is not None:
            raise ResultsError(err)
        return
    from mpidl.comm import CollectiveError
    try:
        comm.agree(err)
    except CollectiveError as e:
        raise ResultsError(str(e)) from None


def _value(v, series, name):
    mod = type(v).__module__
    if mod.startswith("torch"):
        v = v.detach().cpu().numpy()
    if isinstance(v, (bool, int, float, np.number, np.bool_)):
        return float(v)
    a = np.asarray(v)
    if a.dtype.kind in "biuf" and a.ndim <= 1:
        return a.astype(np.float64) if a.ndim == 1 else float(a)
    raise TypeError(f"Recorder.log({series!r}): {name!r} must be a number or a 1-D numeric array, "
                    f"got {type(v).__name__}")


class Recorder:
    """Collective to open and close; :meth:`log` is Local (rank 0 writes, others ignore it).

    ``Recorder(path, comm, config)`` starts a new results file (replacing
    ``path`` at :meth:`close`).  ``resume=True`` with ``resume_step=k`` (or
    ``resume=k``) continues an existing file (``path``, or the ``.tmp`` of a
    crashed run): rows with ``step > k`` are dropped and wall time continues.
    """

    def __init__(self, path, comm=None, config: dict | None = None, *, resume=False, resume_step=None,
                 label=None, flush_every: int = 100, flush_seconds: float = 30.0, **attrs):
        if resume is not False and resume is not True and resume is not None:
            resume_step, resume = int(resume), True
        self.path = os.fspath(path)
        self.tmp = self.path + ".tmp"
        self.comm = comm
        self.active = comm is None or comm.rank == 0
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = float(flush_seconds)
        self._buf: dict = {}
        self._nbuf = 0
        self._file = None
        self._t0 = time.monotonic()
        self._last_flush = self._t0
        self._time_offset = 0.0
        err = None
        if self.active:
            try:
                self._open(config, bool(resume), resume_step, label, attrs)
            except (OSError, TypeError, ValueError) as e:
                err = f"cannot open results file {self.tmp}: {e}"
        _agree(comm, err)

    def _open(self, config, resume, resume_step, label, attrs):
        import h5py
        from mpidl import __version__
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        src = None
        if resume:
            # A .tmp exists only while a run writes it, or after a run crashed: then it is newer
            # than path (which a previous, cleanly stopped invocation left) and holds its rows.
            src = self.tmp if _readable(self.tmp) else None
            if src is None and os.path.exists(self.tmp):
                log.warning("results: %s is damaged; resuming from %s", self.tmp, self.path)
            if src is None and os.path.exists(self.path):
                src = self.path
            if src is None:
                log.warning("results: nothing to resume at %s; starting a new file", self.path)
        if src == self.path:
            shutil.copyfile(self.path, self.tmp)  # the finished file stays intact until close()
        if src is not None:
            self._file = f = h5py.File(self.tmp, "a")
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{src} is not an mpidl results file")
            self._truncate(resume_step)
            resumes = json.loads(f.attrs.get("resumes", "[]"))
            resumes.append({"step": resume_step, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            f.attrs["resumes"] = json.dumps(resumes)
        else:
            if os.path.exists(self.path):
                log.info("results: %s will be replaced when this run closes it", self.path)
            self._file = f = h5py.File(self.tmp, "w", track_order=True)
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["resumes"] = "[]"
        if config is not None or "config" not in f.attrs:  # a resume without config keeps the old one
            f.attrs["config"] = json.dumps(config or {}, default=_json_default)
        f.attrs["mpidl_version"] = __version__
        f.attrs["world_size"] = self.comm.size if self.comm is not None else 1
        if label is not None or "label" not in f.attrs:
            f.attrs["label"] = label or _default_label(self.path)
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v, default=_json_default) if isinstance(v, (dict, list, tuple)) else v
        f.flush()

    def _truncate(self, resume_step):
        f = self._file
        last_t = 0.0
        for name, g in f.items():
            if "step" not in g:
                continue
            steps = g["step"][...]
            keep = len(steps) if resume_step is None else int(np.searchsorted(steps, resume_step, side="right"))
            for ds in g.values():
                ds.resize(keep, axis=0)
            if keep and "wall_time" in g:
                wt = g["wall_time"][:keep]
                wt = wt[np.isfinite(wt)]
                if wt.size:
                    last_t = max(last_t, float(wt.max()))
        # the wall time recorded when the resumed checkpoint was made durable (see sync)
        synced = [d for d in json.loads(f.attrs.get("durable", "[]")) if d.get("step") == resume_step]
        if synced:
            last_t = max(last_t, float(synced[-1]["wall_time"]))
        self._time_offset = last_t
        # events from the resumed step on belong to a history this run replaces (a resize at step k
        # was recorded by an invocation that resumed from k: this one records its own, if any)
        events = [e for e in json.loads(f.attrs.get("events", "[]"))
                  if resume_step is None or int(e.get("step", 0)) < resume_step]
        f.attrs["events"] = json.dumps(events)

    # -- writing ----------------------------------------------------------------
    def event(self, kind: str, step: int, **info) -> None:
        """Local. Record an event of the run (a resize: ``from``/``to`` ranks) in the ``events``
        attribute (JSON list of ``{kind, step, created, ...}``), which ``mpidl report`` lists;
        written at once (rank 0)."""
        if not self.active or self._file is None:
            return
        ev = {"kind": str(kind), "step": int(step), **info, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        events = json.loads(self._file.attrs.get("events", "[]"))
        events.append(json.loads(json.dumps(ev, default=_json_default)))
        self._file.attrs["events"] = json.dumps(events)
        self._file.flush()

    def elapsed(self) -> float:
        """Local. Wall time of the run so far, including earlier runs before a resume."""
        return self._time_offset + time.monotonic() - self._t0

    def log(self, series: str, step: int, **scalars) -> None:
        """Local. Append one row (``step`` plus named numbers or 1-D arrays) to ``series``."""
        if not self.active:
            return
        if self._file is None:
            raise ResultsError(f"results file {self.path} is closed")
        if not series or "/" in series:
            raise ValueError(f"bad series name {series!r}")
        row = {"step": int(step)}
        for k, v in scalars.items():
            if k in _RESERVED or "/" in k:
                raise ValueError(f"Recorder.log: bad column name {k!r}")
            row[k] = _value(v, series, k)
        row.setdefault("wall_time", self.elapsed())
        self._buf.setdefault(series, []).append(row)
        self._nbuf += 1
        if self._nbuf >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Local. Write buffered rows and flush the HDF5 file (rank 0)."""
        if not self.active or self._file is None:
            return
        f = self._file
        for series, rows in self._buf.items():
            if not rows:
                continue
            g = f.require_group(series)
            n0 = g["step"].shape[0] if "step" in g else 0
            cols = list(dict.fromkeys(k for r in rows for k in r))
            cols += [k for k in g if k not in cols]
            m = len(rows)
            for c in cols:
                first = next((r[c] for r in rows if c in r), None)
                width = () if first is None or np.ndim(first) == 0 else (len(first),)
                if c not in g:
                    dtype = np.int64 if c == "step" else np.float64
                    ds = g.create_dataset(c, shape=(n0,) + width, maxshape=(None,) + width, dtype=dtype,
                                          chunks=(256,) + width, fillvalue=0 if c == "step" else np.nan)
                else:
                    ds = g[c]
                    width = ds.shape[1:]
                block = np.full((m,) + width, 0 if c == "step" else np.nan, dtype=ds.dtype)
                for i, r in enumerate(rows):
                    if c in r:
                        v = r[c]
                        if np.shape(v) != width:
                            raise ValueError(f"series {series!r} column {c!r}: shape {np.shape(v)} != {width}")
                        block[i] = v
                ds.resize(n0 + m, axis=0)
                ds[n0:] = block
        self._buf.clear()
        self._nbuf = 0
        f.flush()
        self._last_flush = time.monotonic()

    def sync(self, step: int | None = None) -> None:
        """Collective. Make every row logged so far durable: write them, flush HDF5, fsync (rank 0).

        Call it before a checkpoint of ``step`` is declared complete: a crash
        after the checkpoint then loses no row up to it, and a resume from it
        continues the wall time from this moment (kept in the ``durable``
        attribute, the newest 32 checkpoints).  A failure raises
        :class:`ResultsError` on every rank.
        """
        err = None
        if self.active and self._file is not None:
            try:
                if step is not None:
                    durable = json.loads(self._file.attrs.get("durable", "[]"))
                    durable = [d for d in durable if d.get("step") != int(step)]
                    durable.append({"step": int(step), "wall_time": self.elapsed()})
                    self._file.attrs["durable"] = json.dumps(durable[-32:])
                self.flush()
                fd = os.open(self.tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except (OSError, ValueError) as e:
                err = f"cannot make results file {self.tmp} durable: {e}"
        _agree(self.comm, err)

    def close(self) -> None:
        """Collective. Write what is buffered and rename ``path.tmp`` to ``path`` (idempotent)."""
        err = None
        if self.active and self._file is not None:
            try:
                self.flush()
                self._file.close()
                self._file = None
                os.replace(self.tmp, self.path)
            except (OSError, ValueError) as e:
                err = f"cannot finish results file {self.path}: {e}"
        _agree(self.comm, err)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# -- consensus error ------------------------------------------------------------
def consensus_error(comm, x) -> float:
    """Collective. sqrt(mean_i ||x_i - xbar||^2): one allreduce of ``x``, one scalar allreduce.

    Not charged to ``comm``'s byte and message counters (it is a measurement).
    """
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(x)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    with _uncounted(comm):
        xbar = comm.allreduce(a, op="mean")
        d = a.astype(np.float64, copy=False) - xbar
        total = comm.allreduce(float(np.dot(d.ravel(), d.ravel())), op="sum")
    return math.sqrt(max(total, 0.0) / comm.size)


# -- progress ----------------------------------------------------------------------
def _fmt_time(s):
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, r = divmod(s, 3600)
    m, s = divmod(r, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_val(v):
    if isinstance(v, float) or isinstance(v, np.floating):
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Local. Rank 0 shows progress: a bar on a terminal, a log line every ``every`` steps otherwise.

    ``update(step, loss=..., acc=...)`` after each step (``step`` counts from
    ``start``, the resume step); ``close()`` at the end.  Other ranks do nothing.
    """

    def __init__(self, total_steps: int, comm=None, every: int | None = None, start: int = 0,
                 stream=None, width: int = 28, min_interval: float = 0.25):
        self.total = max(0, int(total_steps))
        self.active = comm is None or comm.rank == 0
        self.start = int(start)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = int(every) if every else max(1, (self.total - self.start) // 20 or 1)
        self.width = width
        self.min_interval = min_interval
        self._t0 = time.monotonic()
        self._last_draw = -math.inf
        self._drawn = False
        self.step = self.start

    def _text(self, step, scalars):
        done = step - self.start
        el = time.monotonic() - self._t0
        rate = done / el if el > 0 and done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        vals = " ".join(f"{k} {_fmt_val(v)}" for k, v in scalars.items())
        return f"{step}/{self.total} {vals}".rstrip() + f" | {rate:.3g} steps/s ETA {_fmt_time(eta)}"

    def update(self, step: int, **scalars) -> None:
        """Local. Report that ``step`` is done, with the given scalars."""
        if not self.active:
            return
        self.step = int(step)
        last = self.step >= self.total
        if self.tty:
            now = time.monotonic()
            if not last and now - self._last_draw < self.min_interval:
                return
            self._last_draw = now
            frac = min(1.0, self.step / self.total) if self.total else 1.0
            fill = int(round(frac * self.width))
            bar = "#" * fill + "." * (self.width - fill)
            self.stream.write(f"\r[{bar}] {self._text(self.step, scalars)}\x1b[K")
            self.stream.flush()
            self._drawn = True
        elif last or (self.step - self.start) % self.every == 0:
            pct = 100.0 * self.step / self.total if self.total else 100.0
            progress_log.info("step %s (%.0f%%)", self._text(self.step, scalars), pct)

    def close(self) -> None:
        """Local. End the bar's line."""
        if self.active and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def report(paths, out_dir, stream=None) -> dict:
    """Local. Summary table (to ``stream``, default stdout; False: none) and PNG plots; see :mod:`mpidl.plots`."""
    from mpidl.plots import report as _report
    return _report(paths, out_dir, stream=stream)
