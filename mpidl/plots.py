"""``report``: a summary table and PNG plots of one or more results files.

For every logged metric, one PNG ``<series>_<metric>.png`` (a metric
logged in several series is drawn from the sparsest one, where it is computed) with up to three panels: the metric against step,
against wall time and against bytes sent (when the series has a ``bytes*``
column), every run overlaid so algorithms can be compared at a glance.
Metrics whose name says they shrink over decades (consensus error, gradient
norm, stationarity, residual, gap, suboptimality) use a log scale.  A metric
logged as a 1-D array per step (e.g. per-agent accuracy) is drawn as its
mean with a min..max band; so are the columns ``agentNNN_<name>`` (one per
agent), gathered into ``agents_<name>``.

matplotlib is an optional extra (``pip install mpidl[plot]``); it is
imported here, lazily, with the Agg canvas only (no pyplot, no backend
switch).  The table is also written to ``<out_dir>/summary.txt``.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np

from mpidl.errors import MpidlError
from mpidl.results import load_results

__all__ = ["report", "summary_table"]

_X_TIME = ("wall_time", "wall", "time")
_AGENT_COL = re.compile(r"^agent(\d+)_(.+)$")
_LOG_WORDS = ("consensus", "grad", "stationar", "residual", "gap", "subopt", "error")
_NOT_METRICS = ("step", "epoch") + _X_TIME


def _group_agents(runs):
    """Columns ``agentNNN_<name>`` (one per agent) become one (rows, agents) column ``agents_<name>``."""
    for r in runs:
        for sname, cols in r["series"].items():
            groups = {}
            for c in list(cols):
                m = _AGENT_COL.match(c)
                if m and np.ndim(cols[c]) == 1:
                    groups.setdefault(m.group(2), []).append((int(m.group(1)), c))
            for name, members in groups.items():
                members.sort()
                cols[f"agents_{name}"] = np.stack([cols.pop(c) for _, c in members], axis=1)
    return runs


def _bytes_col(cols):
    for c in ("bytes", "bytes_sent", "comm_bytes"):
        if c in cols:
            return c
    return next((c for c in cols if c.startswith("bytes")), None)


def _metrics(cols):
    b = _bytes_col(cols)
    return [c for c in cols if c not in _NOT_METRICS and c != b and not c.startswith("bytes")
            and not c.startswith("messages")]


def _human_bytes(n):
    if n is None or not math.isfinite(n):
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000.0


def _last(a):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim > 1:
        a = np.nanmean(a, axis=tuple(range(1, a.ndim)))
    ok = np.flatnonzero(np.isfinite(a))
    return float(a[ok[-1]]) if ok.size else math.nan


def _best(a, higher):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim > 1:
        a = np.nanmean(a, axis=tuple(range(1, a.ndim)))
    a = a[np.isfinite(a)]
    if not a.size:
        return math.nan
    return float(a.max() if higher else a.min())


def _labels(runs):
    labels = [r["label"] for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({os.path.basename(os.path.dirname(os.path.abspath(r['path']))) or i})"
                  if labels.count(lab) > 1 else lab for i, (lab, r) in enumerate(zip(labels, runs))]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{i}" for i, lab in enumerate(labels)]
    return labels


_PRIORITY = ("train_loss", "loss", "train_acc", "acc", "test_acc", "test_loss", "consensus_error",
             "generalization_gap", "agent_acc_min", "agent_acc_max")


def choose_metrics(runs) -> list:
    """Local. ``(series, metric)`` pairs to show, one per metric name.

    A metric logged in several series (a driver that copies the latest
    evaluation into every training row) is taken from the series where it has
    the fewest rows, i.e. where it is computed.
    """
    votes = {}  # metric -> {series: runs in which it is the sparsest series holding the metric}
    for r in runs:
        have = {}
        for s in r["series"]:
            n = len(r["series"][s]["step"])
            for m in _metrics(list(r["series"][s])):
                have.setdefault(m, []).append((n, s != "eval", s))
        for m, cands in have.items():
            votes.setdefault(m, {})
            s = min(cands)[2]
            votes[m][s] = votes[m].get(s, 0) + 1
    return [(max(v, key=lambda s: (v[s], s == "eval")), m) for m, v in votes.items()]


def summary_table(runs, max_metrics: int = 7) -> str:
    """Local. One line per run: steps, wall time, bytes, final metrics and best accuracies."""
    labels = _labels(runs)
    pick = choose_metrics(runs)
    rank = lambda sm: (_PRIORITY.index(sm[1]) if sm[1] in _PRIORITY else len(_PRIORITY), pick.index(sm))
    cols = sorted(pick, key=rank)[:max_metrics]
    best = lambda m: m.endswith("acc")
    head = ["run", "algorithm", "agents", "steps", "wall", "bytes"]
    for s, m in cols:
        head.append(m)
        if best(m):
            head.append(f"best {m}")
    rows = []
    for lab, r in zip(labels, runs):
        ser = r["series"]
        steps = max((int(np.max(v["step"])) for v in ser.values() if len(v["step"])), default=0)
        wall = max((_last(v[c]) for v in ser.values() for c in _X_TIME if c in v), default=math.nan)
        byts = [_last(v[b]) for v in ser.values() if (b := _bytes_col(list(v)))]
        cfg = r["config"] if isinstance(r["config"], dict) else {}
        algo = cfg.get("algorithm")
        if isinstance(algo, dict):
            algo = algo.get("name")
        row = [lab, str(algo or "-"), str(r["attrs"].get("world_size", "-")), str(steps),
               "-" if not math.isfinite(wall) else f"{wall:.1f}s", _human_bytes(max(byts) if byts else None)]
        for s, m in cols:
            v = ser.get(s, {}).get(m)
            row.append("-" if v is None else f"{_last(v):.4g}")
            if best(m):
                row.append("-" if v is None else f"{_best(v, True):.4g}")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
    return "\n".join(lines + event_lines(runs, labels))


def event_lines(runs, labels=None) -> list:
    """Local. One line per recorded event of the runs (a resize: step, old and new number of ranks)."""
    labels = labels or _labels(runs)
    out = []
    for lab, r in zip(labels, runs):
        try:
            events = json.loads(r["attrs"].get("events", "[]") or "[]")
        except (TypeError, ValueError):
            events = []
        for e in events:
            if e.get("kind") == "resize":
                out.append(f"{lab}: resized at step {e.get('step')}: {e.get('from')} -> {e.get('to')} ranks"
                           + (f" ({e['what']})" if e.get("what") else ""))
            else:
                out.append(f"{lab}: {e.get('kind')} at step {e.get('step')}")
    return ([""] + ["events:"] + ["  " + line for line in out]) if out else []


def _safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _plot_metric(series, metric, runs, labels, out_dir, FigureCanvas, Figure):
    axes_x = [("step", "step")]
    if any(c in r["series"].get(series, {}) for r in runs for c in _X_TIME):
        axes_x.append(("time", "wall time [s]"))
    if any(_bytes_col(list(r["series"].get(series, {}))) for r in runs):
        axes_x.append(("bytes", "bytes sent"))
    fig = Figure(figsize=(4.6 * len(axes_x), 3.6), layout="constrained")
    FigureCanvas(fig)
    axs = fig.subplots(1, len(axes_x), squeeze=False)[0]
    logy = any(w in metric.lower() for w in _LOG_WORDS)
    drawn = 0
    for lab, r in zip(labels, runs):
        d = r["series"].get(series)
        if d is None or metric not in d:
            continue
        y = np.asarray(d[metric], dtype=np.float64)
        lo = hi = None
        if y.ndim > 1:
            flat = y.reshape(len(y), -1)
            lo, hi, y = np.nanmin(flat, 1), np.nanmax(flat, 1), np.nanmean(flat, 1)
        for ax, (kind, _) in zip(axs, axes_x):
            if kind == "step":
                x = d["step"]
            elif kind == "time":
                x = next((d[c] for c in _X_TIME if c in d), None)
            else:
                b = _bytes_col(list(d))
                x = d[b] if b else None
            if x is None:
                continue
            x = np.asarray(x, dtype=np.float64)
            ok = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
            if not ok.any():
                continue
            line, = ax.plot(x[ok], y[ok], label=lab, lw=1.4)
            if lo is not None:
                ax.fill_between(x[ok], lo[ok], hi[ok], color=line.get_color(), alpha=0.2, lw=0)
        drawn += 1
    if not drawn:
        return None
    for ax, (_, xlabel) in zip(axs, axes_x):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{series} {metric}")
        ax.grid(True, alpha=0.3)
        if logy:
            ax.set_yscale("log")
    axs[0].legend(fontsize="small")
    fig.suptitle(f"{series}: {metric}")
    out = os.path.join(out_dir, f"{_safe(series)}_{_safe(metric)}.png")
    fig.savefig(out, dpi=110)
    return out


def report(paths, out_dir, stream=None) -> dict:
    """Local. Print a summary table of ``paths`` and write PNG plots into ``out_dir``.

    Returns ``{"table": str, "plots": [png paths], "summary": path of summary.txt}``.
    ``stream`` receives the table (default ``sys.stdout``; ``False`` for none).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise MpidlError("report: give at least one results file")
    runs = _group_agents([load_results(p) for p in paths])
    table = summary_table(runs)
    os.makedirs(out_dir, exist_ok=True)
    summary = os.path.join(out_dir, "summary.txt")
    with open(summary, "w") as f:
        f.write(table + "\n")
    if stream is None:
        stream = sys.stdout
    if stream:
        stream.write(table + "\n")
        stream.flush()
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MpidlError("report: plots need matplotlib (pip install matplotlib, or mpidl[plot]); "
                         f"the table was written to {summary}") from None
    labels = _labels(runs)
    plots = []
    for s, m in choose_metrics(runs):
        out = _plot_metric(s, m, runs, labels, out_dir, FigureCanvasAgg, Figure)
        if out:
            plots.append(out)
    return {"table": table, "plots": plots, "summary": summary}
