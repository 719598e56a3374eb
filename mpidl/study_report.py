"""The report of a study (:mod:`mpidl.study`): ``report.md``, three PNG plots, ``study.json``.

Everything is read back from the runs' results files (``<out>/<method>/seed<s>/results.h5``,
the driver's ``eval`` series), never from memory, so ``mpidl compare --report-only``
rewrites the same report.  Per run:

* at the budget: the run's last ``eval`` row (the driver evaluates the step
  where the budget stopped it): ``test_acc``, ``wall`` (seconds, the results
  file's clock: training plus the driver's evaluations and checkpoints),
  ``bytes_sent`` (all ranks together) and ``epoch``;
* best: the highest ``test_acc`` of any eval row and the first row reaching it
  (its ``epoch`` and ``wall``);
* ``first_metrics`` / ``final_metrics``: every numeric column of the first and the
  last eval row, the algorithm's own metrics included (NEXT's ``stationarity``,
  ``sparsity``, ``objective``; ``consensus_error``; ...).

Per method, each quantity is the mean and the sample standard deviation
(ddof = 1; 0 for a single seed) over the seeds with results.  Curves: for
each x in (wall, bytes_sent, epoch) every seed's ``test_acc`` is linearly
interpolated (``numpy.interp``) onto a common grid of 100 points from the
largest first x to the smallest last x over the seeds (no extrapolation;
geometric spacing for bytes), and the plots draw the mean with a mean +- std band.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from mpidl.errors import MpidlError

__all__ = ["write_report", "run_numbers", "method_stats", "GRID_POINTS"]

GRID_POINTS = 100
_AXES = (("wall", "wall time [s]", "wall"), ("bytes_sent", "bytes sent (all ranks)", "bytes"),
         ("epoch", "epochs", "epoch"))
_COLS = ("step", "epoch", "wall", "bytes_sent", "test_acc")


def run_numbers(path) -> dict | None:
    """Local. The eval curve, final and best numbers of one results file (None: no eval row yet)."""
    from mpidl.metrics import load_results
    res = load_results(path)
    ev = res["series"].get("eval")
    if not ev or not len(ev["step"]) or "test_acc" not in ev:
        return None
    cur = {c: np.asarray(ev[c], dtype=np.float64) for c in _COLS if c in ev}
    acc = cur["test_acc"]
    ok = np.isfinite(acc)
    if not ok.any():
        return None
    cur = {c: v[ok] for c, v in cur.items()}
    cols = {c: np.asarray(v, dtype=np.float64)[ok] for c, v in ev.items()
            if getattr(v, "ndim", 0) == 1 and np.asarray(v).dtype.kind in "fiu"}
    acc = cur["test_acc"]
    j = int(np.argmax(acc))  # the first row reaching the best accuracy
    final = {c: float(v[-1]) for c, v in cur.items()}
    best = {"test_acc": float(acc[j]), "epoch": float(cur["epoch"][j]), "wall": float(cur["wall"][j]),
            "step": float(cur["step"][j])}
    # every numeric column of the first and the last eval row (the algorithm's own metrics too,
    # e.g. NEXT's stationarity and sparsity); NaN -> None in study.json
    first_metrics = {c: float(v[0]) for c, v in sorted(cols.items())}
    final_metrics = {c: float(v[-1]) for c, v in sorted(cols.items())}
    return {"curve": {c: v.tolist() for c, v in cur.items()}, "final": final, "best": best,
            "first_metrics": first_metrics, "final_metrics": final_metrics,
            "world_size": int(res["attrs"].get("world_size", 0))}


def _ms(values):
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not a.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def method_stats(per_seed: dict) -> dict:
    """Local. Mean and std over seeds of the final and best numbers (``per_seed``: seed -> run_numbers)."""
    rs = [r for r in per_seed.values() if r is not None]
    out = {f"final_{c}": _ms([r["final"][c] for r in rs]) for c in ("test_acc", "wall", "bytes_sent", "epoch")}
    out.update({f"best_{c}": _ms([r["best"][c] for r in rs]) for c in ("test_acc", "epoch", "wall")})
    return out


def _grid(curves, x):
    """Mean and std of test_acc on a common grid of x (None when no seed has two points)."""
    cs = [(np.asarray(c[x]), np.asarray(c["test_acc"])) for c in curves if len(c[x])]
    if not cs:
        return None
    lo, hi = max(float(c[0][0]) for c in cs), min(float(c[0][-1]) for c in cs)
    if not hi > lo:
        g = np.array([hi])
    elif x == "bytes_sent" and lo > 0:
        g = np.geomspace(lo, hi, GRID_POINTS)
    else:
        g = np.linspace(lo, hi, GRID_POINTS)
    ys = np.stack([np.interp(g, cx, cy) for cx, cy in cs])
    return {"x": g.tolist(), "mean": ys.mean(0).tolist(),
            "std": (ys.std(0, ddof=1) if len(cs) > 1 else np.zeros(len(g))).tolist(), "seeds": len(cs)}


def _fmt(st, fmt, scale=1.0):
    if st["mean"] is None:
        return "-"
    return f"{st['mean'] / scale:{fmt}} ± {st['std'] / scale:{fmt}}"


def _markdown(plan, methods, missing) -> str:
    b = plan["budget"]
    unit = {"epochs": "epochs", "wall_seconds": "s of wall time", "bytes": "bytes sent"}[b["kind"]]
    lines = [f"# Study {plan['title']}", "",
             f"Budget: {b['value']:g} {unit} per run; seeds {plan['seeds']}; {plan['world_size']} MPI ranks; "
             f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", "", _machine_line(plan), "",
             "Values are mean ± std (sample std over seeds) at the budget, from each run's last `eval` row; "
             "best = the highest test accuracy of any evaluation and when it was first reached.", "",
             "| method | algorithm | seeds | test acc | wall [s] | bytes sent [MB] | epochs | best test acc "
             "| best at epoch | best at wall [s] | load | stops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        s = m["summary"]
        stops = ", ".join(f"{k} {v}" for k, v in sorted(m["stops"].items())) or "-"
        lines.append(f"| {name} | {m['algorithm']} | {s['final_test_acc']['n']} | {_fmt(s['final_test_acc'], '.4f')} "
                     f"| {_fmt(s['final_wall'], '.1f')} | {_fmt(s['final_bytes_sent'], '.4g', 1e6)} "
                     f"| {_fmt(s['final_epoch'], '.2f')} | {_fmt(s['best_test_acc'], '.4f')} "
                     f"| {_fmt(s['best_epoch'], '.2f')} | {_fmt(s['best_wall'], '.1f')} | {_fmt(s['load'], '.1f')} "
                     f"| {stops} |")
    lines += ["", "## Every run", "", "| method | seed | test acc | wall [s] | bytes sent [MB] | epochs | steps "
              "| best test acc | load | stop |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        for seed, r in m["runs"].items():
            if r is None:
                continue
            f = r["final"]
            lines.append(f"| {name} | {seed} | {f['test_acc']:.4f} | {f['wall']:.1f} | {f['bytes_sent'] / 1e6:.4g} "
                         f"| {f['epoch']:.2f} | {int(f['step'])} | {r['best']['test_acc']:.4f} "
                         f"| {_load_cell(r.get('load'))} | {r['stop']} |")
    if missing:
        lines += ["", "Runs without results (not run yet, or no evaluation): " + ", ".join(missing) + "."]
    lines += ["", "Test accuracy against wall time, bytes sent and epochs (mean, band = mean ± std over seeds):", ""]
    lines += [f"![test accuracy vs {lab}](test_acc_vs_{tag}.png)" for _, lab, tag in _AXES]
    return "\n".join(lines) + "\n"


def _machines(runs) -> list:
    """Local. The distinct machine facts (:func:`mpidl.study.machine_facts`) of the runs, in first-seen order."""
    seen = []
    for r in runs:
        mf = r.get("machine")
        if mf and mf not in seen:
            seen.append(mf)
    return seen


def _load(runs) -> dict | None:
    """Local. The 1-minute load average over every run's samples: mean of the runs' means, min, max."""
    ls = [r["load"] for r in runs if r.get("load")]
    if not ls:
        return None
    return {"mean": float(np.mean([x["mean"] for x in ls])), "min": min(x["min"] for x in ls),
            "max": max(x["max"] for x in ls), "runs": len(ls)}


def _load_cell(ld) -> str:
    return "-" if not ld else f"{ld['mean']:.1f}"


def _machine_line(plan) -> str:
    """Local. The report's line on where the runs ran and how loaded the machine was."""
    parts = []
    for mf in plan.get("machine") or []:
        per = "/".join(str(x) for x in mf["ranks_per_node"])
        if mf.get("link"):
            link = f"link {mf['link']}"
        elif mf["nodes"] == 1:
            link = "no network between the ranks (one node: shared memory)"
        else:
            link = "link rate not recorded (set MPIDL_LINK_RATE)"
        parts.append(f"{mf['ranks']} ranks on {mf['nodes']} node(s) ({per} per node), {link}; rank 0 on "
                     f"{mf['host']} ({mf['cpus']} cores)")
    text = "Machine: " + ("; ".join(parts) if parts else "not recorded (runs from before machine facts were kept)")
    ld = plan.get("load")
    if ld:
        text += (f". 1-min load average during the runs (sampled every {_period():g} s on rank 0's host): "
                 f"mean {ld['mean']:.1f}, min {ld['min']:.1f}, max {ld['max']:.1f} over {ld['runs']} run(s); "
                 "the `load` columns give each run's mean")
    return text + "."


def _period():
    from mpidl.study import LOAD_PERIOD_S
    return LOAD_PERIOD_S


def _plot(methods, x, xlabel, path, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    logx = x == "bytes_sent"
    for name, m in methods.items():
        g = m["grid"].get(x)
        if g is None:
            continue
        gx, mu, sd = (np.asarray(g[k]) for k in ("x", "mean", "std"))
        keep = gx > 0 if logx else np.ones(len(gx), bool)
        if not keep.any():
            logx = False
            keep = np.ones(len(gx), bool)
        line, = ax.plot(gx[keep], mu[keep], lw=1.6, label=f"{name} ({g['seeds']} seeds)",
                        marker="o" if keep.sum() == 1 else None)
        ax.fill_between(gx[keep], (mu - sd)[keep], (mu + sd)[keep], color=line.get_color(), alpha=0.2, lw=0)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_report(plan) -> dict:
    """Local. Read every run's results and write report.md, study.json and the PNGs into ``plan["out"]``.

    Returns the per-method summary ``{method: stats}`` (see :func:`method_stats`).
    """
    from mpidl.study import _write_json
    methods, missing = {}, []
    for m in plan["methods"]:
        methods[m["name"]] = {"algorithm": m["algorithm"], "runs": {}, "stops": {}}
    for run in plan["runs"]:
        path = os.path.join(run["dir"], "results.h5")
        done = os.path.join(run["dir"], "done.json")
        r = None
        if os.path.exists(path) or os.path.exists(path + ".tmp"):
            r = run_numbers(path)
        stop, marker = None, {}
        if os.path.exists(done):
            with open(done) as f:
                marker = json.load(f)
            stop = marker.get("stop")
        m = methods[run["method"]]
        if r is None:
            missing.append(f"{run['method']} seed {run['seed']}")
            m["runs"][str(run["seed"])] = None
            continue
        r["stop"] = stop or "unfinished"
        r["load"], r["machine"] = marker.get("load"), marker.get("machine")    # None: an older done.json
        m["runs"][str(run["seed"])] = r
        m["stops"][r["stop"]] = m["stops"].get(r["stop"], 0) + 1
    for m in methods.values():
        m["summary"] = method_stats({s: r for s, r in m["runs"].items()})
        m["summary"]["load"] = _ms([r["load"]["mean"] for r in m["runs"].values() if r is not None and r.get("load")])
        curves = [r["curve"] for r in m["runs"].values() if r is not None]
        m["grid"] = {x: _grid(curves, x) for x, _, _ in _AXES}
    sizes = sorted({r["world_size"] for m in methods.values() for r in m["runs"].values() if r is not None})
    plan = dict(plan, world_size=(sizes[0] if len(sizes) == 1 else sizes) if sizes else None)  # the runs' own
    out = plan["out"]
    os.makedirs(out, exist_ok=True)
    runs = [r for m in methods.values() for r in m["runs"].values() if r is not None]
    plan = dict(plan, machine=_machines(runs), load=_load(runs))
    doc = {"format": "mpidl-study", "format_version": 1, "title": plan["title"], "budget": plan["budget"],
           "seeds": plan["seeds"], "world_size": plan["world_size"], "missing": missing,
           "machine": plan["machine"], "load": plan["load"], "methods": methods}
    _write_json(os.path.join(out, "study.json"), _finite(doc))
    md = os.path.join(out, "report.md")
    with open(md + ".tmp", "w") as f:
        f.write(_markdown(plan, methods, missing))
    os.replace(md + ".tmp", md)
    try:
        for x, xlabel, tag in _AXES:
            _plot(methods, x, xlabel, os.path.join(out, f"test_acc_vs_{tag}.png"),
                  f"{plan['title']}: test accuracy vs {xlabel.split(' [')[0]}")
    except ImportError:
        raise MpidlError("compare: the plots need matplotlib (pip install mpidl[plot]); "
                         f"report.md and study.json are in {out}") from None
    return {name: m["summary"] for name, m in methods.items()}


def _finite(o):
    """NaN/inf -> None so study.json is strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o
