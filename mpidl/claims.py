"""The papers' claims in one table: ``python -m mpidl.claims {run,page}`` (docs/claims.md).

The claims live in ``jobs/studies/claims/claims.toml``: one ``[[claim]]`` per claim, with the
paper's statement, the study that tests it (a ``mpidl compare`` study in the same folder, or
none with ``why`` it cannot be tested here), the method and its baseline, and the checks that
decide the verdict.  Two commands:

* ``python -m mpidl.claims run [STUDY ...]`` runs each study with ``mpiexec -n <ranks>
  python -m mpidl compare`` (under ``nice``), samples the 1-minute load average every few
  seconds while it runs, copies the study's ``report.md``, ``study.json`` and plots into
  ``docs/claims/<study>/`` with a ``load.json``, then rewrites the page.
* ``python -m mpidl.claims page [--check]`` writes ``docs/claims.md`` from those copies
  (``--check``: exit 1 when the page on disk differs from what it would write).

A check compares one number of the runs' last evaluation (``final_metrics`` in study.json,
or ``first_metrics`` with ``first = true``) between the method and its baseline, seed by
seed (the same seed = the same data and initial model):

* ``stat = "diff"``: method - baseline;  ``"ratio"``: method / baseline;
  ``"speedup"``: baseline / method;  ``"value"``: the method's own number;
  ``"drop"``: the method's first evaluation / its last (how far a quantity fell);
* ``at_least`` / ``at_most``: the bound the mean over seeds must meet (``all_seeds = true``:
  every seed's value must meet it; the claims about time use it, their machine being loaded).

All checks met -> the claim's ``pass`` verdict (default "reproduced"), else its ``fail``
verdict (default "not reproduced").  Claims without a study are "not testable here".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np

from mpidl.errors import MpidlError

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "jobs" / "studies" / "claims"
REGISTRY = STUDIES / "claims.toml"
DOCS = ROOT / "docs"
PAGE = DOCS / "claims.md"
REPORTS = DOCS / "claims"
_COPY = ("report.md", "study.json", "test_acc_vs_wall.png", "test_acc_vs_bytes.png", "test_acc_vs_epoch.png")
_STATS = ("diff", "ratio", "speedup", "value", "drop")


class ClaimsError(MpidlError):
    pass


def load_registry(path=REGISTRY) -> list[dict]:
    """Local. The ``[[claim]]`` tables, checked: every study named exists, every check is well formed."""
    claims = tomllib.loads(Path(path).read_text()).get("claim", [])
    ids = set()
    for c in claims:
        for k in ("id", "paper", "statement"):
            if not isinstance(c.get(k), str) or not c[k]:
                raise ClaimsError(f"claim {c.get('id', '?')}: {k} missing")
        if c["id"] in ids:
            raise ClaimsError(f"two claims have the id {c['id']!r}")
        ids.add(c["id"])
        if "study" in c:
            if not (Path(path).parent / f"{c['study']}.toml").is_file():
                raise ClaimsError(f"claim {c['id']}: no study {c['study']}.toml")
            for k in ("ranks", "method", "baseline", "check"):
                if k not in c:
                    raise ClaimsError(f"claim {c['id']}: {k} missing")
            for ch in c["check"]:
                if ch.get("stat") not in _STATS or not isinstance(ch.get("metric"), str):
                    raise ClaimsError(f"claim {c['id']}: a check needs metric and stat in {_STATS}: {ch}")
                if "at_least" not in ch and "at_most" not in ch:
                    raise ClaimsError(f"claim {c['id']}: a check needs at_least or at_most: {ch}")
        elif not c.get("why"):
            raise ClaimsError(f"claim {c['id']}: give a study or why it is not testable here")
    return claims


def study_files(path=REGISTRY) -> list[Path]:
    """Local. Every study of the claims folder (all ``*.toml`` but the registry)."""
    d = Path(path).parent
    return sorted(p for p in d.glob("*.toml") if p.name != Path(path).name)


# -- running ----------------------------------------------------------------------------------

def _loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_study(stem, ranks, *, mpiexec=None, nice=5, reports=REPORTS, studies=STUDIES, every=5.0):
    """Local. Run one study under mpiexec, sample the load, copy its report; return the load record."""
    if mpiexec is None:
        cand = Path(sys.executable).parent / "mpiexec"
        mpiexec = str(cand) if cand.exists() else "mpiexec"
    toml = studies / f"{stem}.toml"
    cmd = ([] if not nice else ["nice", "-n", str(nice)]) + [
        mpiexec, "-n", str(ranks), sys.executable, "-m", "mpidl", "compare", str(toml)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(_loadavg())
            stop.wait(every)
    t = threading.Thread(target=sample, daemon=True)
    start = time.time()
    t.start()
    try:
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
    finally:
        stop.set()
        t.join()
    if rc != 0:
        raise ClaimsError(f"{' '.join(cmd)} exited {rc}")
    out = tomllib.loads(toml.read_text()).get("out") or f"studies/{stem}"
    dst = reports / stem
    dst.mkdir(parents=True, exist_ok=True)
    for name in _COPY:
        src = ROOT / out / name
        if src.exists():
            shutil.copyfile(src, dst / name)
    rec = {"command": f"mpiexec -n {ranks} python -m mpidl compare jobs/studies/claims/{stem}.toml",
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
           "wall_s": round(time.time() - start, 1), "cpus": os.cpu_count(),
           "load_1min": {"min": min(samples), "mean": round(float(np.mean(samples)), 2), "max": max(samples),
                         "samples": len(samples), "every_s": every}}
    with open(dst / "load.json", "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    return rec


# -- the page ------------------------------------------------------------------------------

def _per_seed(study, method, metric, first=False):
    runs = study["methods"][method]["runs"]
    key = "first_metrics" if first else "final_metrics"
    out = {}
    for seed, r in runs.items():
        if r is None:
            continue
        v = (r.get(key) or {}).get(metric)
        if v is None and not first and metric in r.get("final", {}):
            v = r["final"][metric]
        if v is not None and math.isfinite(v):
            out[seed] = float(v)
    return out


def _ms(vals):
    a = np.asarray(list(vals), dtype=np.float64)
    if not a.size:
        return None
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0), int(a.size)


def evaluate_check(study, claim, ch) -> dict:
    """Local. The per-seed statistic of one check and whether its mean meets the bound."""
    m, b, metric, stat = ch.get("method", claim["method"]), ch.get("baseline", claim["baseline"]), \
        ch["metric"], ch["stat"]
    mv = _per_seed(study, m, metric, ch.get("first", False))
    bv = _per_seed(study, b, metric, ch.get("first", False)) if stat in ("diff", "ratio", "speedup") else {}
    if stat == "drop":
        bv = _per_seed(study, m, metric, first=True)   # the method's own first evaluation
    seeds = sorted(set(mv) & set(bv)) if stat != "value" else sorted(mv)
    f = {"diff": lambda x, y: x - y, "ratio": lambda x, y: x / y if y else math.inf,
         "speedup": lambda x, y: y / x if x else math.inf, "drop": lambda x, y: y / x if x else math.inf,
         "value": lambda x, y: x}[stat]
    vals = [f(mv[s], bv.get(s)) for s in seeds]
    st = _ms(vals)
    ok = st is not None and all(math.isfinite(v) for v in vals)
    tested = vals if ch.get("all_seeds") else ([st[0]] if ok else [])
    if ok and "at_least" in ch:
        ok = all(v >= ch["at_least"] for v in tested)
    if ok and "at_most" in ch:
        ok = all(v <= ch["at_most"] for v in tested)
    return {"method": m, "baseline": b, "metric": metric, "stat": stat, "seeds": seeds, "value": st, "per_seed": vals,
            "m": _ms(mv[s] for s in seeds), "b": _ms(bv[s] for s in seeds) if bv else None, "met": ok}


def _num(x, metric):
    if metric == "test_acc":
        return f"{x:.4f}"
    if metric == "bytes_sent":
        return f"{x / 1e6:.4g} MB"
    if metric in ("wall",):
        return f"{x:.1f} s"
    return f"{x:.3g}"


def _pm(st, metric):
    if st is None:
        return "-"
    mean, sd, _ = st
    if metric == "bytes_sent":
        return f"{mean / 1e6:.4g} ± {sd / 1e6:.2g} MB"
    if metric == "wall":
        return f"{mean:.1f} ± {sd:.1f} s"
    if metric == "test_acc":
        return f"{mean:.4f} ± {sd:.4f}"
    return f"{mean:.3g} ± {sd:.2g}"


_LABEL = {"test_acc": "test acc", "wall": "wall", "bytes_sent": "bytes sent", "stationarity": "stationarity",
          "sparsity": "share of zero weights", "consensus_error": "consensus error", "objective": "objective"}


def _describe(r, ch):
    lab = _LABEL.get(r["metric"], r["metric"])
    when = " at the first evaluation" if ch.get("first") else ""
    pts = r["stat"] == "diff" and r["metric"] == "test_acc"   # accuracy differences in points
    bs, bu = (100.0, " pt") if pts else (1.0, "")
    bound = (f">= {ch['at_least'] * bs:g}{bu}" if "at_least" in ch else "") + \
        (" and " if "at_least" in ch and "at_most" in ch else "") + \
        (f"<= {ch['at_most'] * bs:g}{bu}" if "at_most" in ch else "")
    v = r["value"]
    mark = "met" if r["met"] else "not met"
    if ch.get("all_seeds"):
        bound += " for every seed"
        if r["stat"] in ("ratio", "speedup", "drop"):
            bound += f", per seed {', '.join(f'{x:.3g}' for x in r['per_seed'])}"
        elif r["stat"] == "diff":
            bound += f", per seed {', '.join(f'{x * bs:+.2f}' for x in r['per_seed'])}"
    if r["stat"] == "value":
        return f"{r['method']} {lab}{when} {_pm(r['m'], r['metric'])} (needs {bound}: {mark})"
    if r["stat"] == "drop":
        return (f"{r['method']} {lab} {_pm(r['b'], r['metric'])} at the first evaluation, "
                f"{_pm(r['m'], r['metric'])} at the last: fell {v[0]:.3g} ± {v[1]:.2g}x (needs {bound}: {mark})")
    head = f"{lab}{when}: {r['method']} {_pm(r['m'], r['metric'])} vs {r['baseline']} {_pm(r['b'], r['metric'])}"
    if r["stat"] == "diff":
        unit, scale = (" pt", 100.0) if r["metric"] == "test_acc" else ("", 1.0)
        return f"{head}; difference {v[0] * scale:+.2f} ± {v[1] * scale:.2f}{unit} (needs {bound}: {mark})"
    word = "speed-up" if r["stat"] == "speedup" else "ratio"
    return f"{head}; {word} {v[0]:.3g} ± {v[1]:.2g}x (needs {bound}: {mark})"


def _setting(stem, study, studies):
    d = tomllib.loads((studies / f"{stem}.toml").read_text())
    data, model, topo = d.get("data", {}), d.get("model", {}), d.get("topology", {})
    b = study["budget"]
    unit = {"epochs": "epochs", "wall_seconds": "s of wall time per run", "bytes": "bytes"}[b["kind"]]
    hidden = model.get("hidden")
    mdl = model.get("name", "mlp") + (f" {list(hidden)}" if hidden else "")
    n = study["world_size"]
    parts = [data.get("dataset", "fashion-mnist"), mdl, f"{n} rank" + ("" if n == 1 else "s")]
    if topo.get("name"):
        parts.append(topo["name"] + (f" + {topo['schedule']} schedule" if topo.get("schedule") else ""))
    parts += [f"{b['value']:g} {unit}", f"seeds {', '.join(map(str, study['seeds']))}"]
    return ", ".join(parts)


def _cell(s):
    return " ".join(str(s).split()).replace("|", "\\|")


def render(registry=REGISTRY, reports=REPORTS, studies=STUDIES) -> str:
    """Local. The markdown of docs/claims.md from the registry and the copied study.json files."""
    claims = load_registry(registry)
    rows = []
    for c in claims:
        stem = c.get("study")
        sj = reports / stem / "study.json" if stem else None
        if not stem:
            verdict, result, setting, link = "not testable here", _cell(c["why"]), _cell(c.get("setting", "-")), "-"
        elif not sj.exists():
            verdict, result, setting, link = "not run yet", "-", "-", "-"
        else:
            study = json.loads(sj.read_text())
            res = [evaluate_check(study, c, ch) for ch in c["check"]]
            met = all(r["met"] for r in res)
            verdict = c.get("pass", "reproduced") if met else c.get("fail", "not reproduced")
            texts = [_describe(r, ch) for r, ch in zip(res, c["check"])]
            missing = study.get("missing") or []
            if missing:
                texts.append(f"runs without results: {', '.join(missing)}")
            lj = reports / stem / "load.json"
            if c.get("timed") and lj.exists():
                ld = json.loads(lj.read_text())["load_1min"]
                texts.append(f"1-min load average during the study {ld['mean']:.1f} (min {ld['min']:.1f}, "
                             f"max {ld['max']:.1f}) on {json.loads(lj.read_text())['cpus']} cores, shared")
            result = _cell("; ".join(texts))
            setting = _cell(_setting(stem, study, studies) + (f"; {c['setting']}" if c.get("setting") else ""))
            link = f"[report](claims/{stem}/report.md)"
        note = f" {_cell(c['note'])}" if c.get("note") else ""
        rows.append(f"| {_cell(c['paper'])} | {_cell(c['statement'])} | {setting} | {result} | {link} "
                    f"| **{verdict}**.{note} |")
    stems = []
    for c in claims:
        if c.get("study") and c["study"] not in stems:
            stems.append(c["study"])
    details = ["", "## The studies", "",
               "Each study's report (tables per method and per run, plots of test accuracy against wall time, "
               "bytes and epochs) is linked below, with the command that reruns it (or `python -m mpidl.claims run "
               "STUDY`, which also copies the report here and records the load) and the machine's 1-minute load "
               "average while it ran.", ""]
    for stem in stems:
        lj = reports / stem / "load.json"
        if not lj.exists():
            details.append(f"- `{stem}`: not run yet (`python -m mpidl.claims run {stem}`).")
            continue
        ld = json.loads(lj.read_text())
        lo = ld["load_1min"]
        details.append(f"- [{stem}](claims/{stem}/report.md): `{ld['command']}`; started {ld['started']}, "
                       f"{ld['wall_s']:.0f} s; load {lo['mean']:.1f} (min {lo['min']:.1f}, max {lo['max']:.1f}) "
                       f"on {ld['cpus']} cores.")
    head = ["# The papers' claims, tested here", "",
            "Generated by `python -m mpidl.claims page` from `jobs/studies/claims/claims.toml` and the studies' "
            "`docs/claims/<study>/study.json`; do not edit by hand. Each study is a `mpidl compare` study in "
            "`jobs/studies/claims/` (3 seeds; budgets in epochs, except the claims about time), run and "
            "copied here by `python -m mpidl.claims run` (all of them) or `python -m mpidl.claims run STUDY`. "
            "Every number below is the mean ± sample std over seeds of the runs' last evaluation, compared seed by "
            "seed with the baseline named beside it (the same seed gives both the same data and initial model). "
            "A verdict is *reproduced* when every check of the claim is met on a setting close to the paper's, "
            "*reproduced in kind* when it is met on a smaller or different setting than the paper's (an MLP on "
            "Fashion-MNIST or digits instead of CIFAR networks), *not reproduced* when a check is not met.", "",
            "The machine: 2 cores shared with other jobs. The claims about time were measured side by side on "
            "that loaded machine (the load is in their row): their ratios are indicative, not speeds. A study runs "
            "all seeds of one method, then all seeds of the next, so a change of load between them biases a time "
            "ratio; the checks of the claims about time therefore require every seed to meet the bound, not only "
            "the mean.", "",
            "| paper | claim (the paper's statement) | our setting | result (mean ± std over seeds) | report "
            "| verdict |", "|---|---|---|---|---|---|"]
    return "\n".join(head + rows + details) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpidl.claims", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run studies (default: every claim's study), copy their reports, write the page")
    r.add_argument("studies", nargs="*", help="study names (file stems in jobs/studies/claims)")
    r.add_argument("--mpiexec", default=None)
    r.add_argument("--nice", type=int, default=5)
    g = sub.add_parser("page", help="write docs/claims.md from docs/claims/*/study.json")
    g.add_argument("--check", action="store_true", help="exit 1 if docs/claims.md differs from what would be written")
    args = p.parse_args(argv)
    try:
        claims = load_registry()
        if args.cmd == "run":
            ranks = {}
            for c in claims:
                if "study" in c:
                    ranks.setdefault(c["study"], c["ranks"])
            todo = args.studies or list(ranks)
            for stem in todo:
                if stem not in ranks:
                    raise ClaimsError(f"no claim uses the study {stem!r}; known: {', '.join(ranks)}")
            for stem in todo:
                rec = run_study(stem, ranks[stem], nice=args.nice, mpiexec=args.mpiexec)
                print(f"claims: {stem} done in {rec['wall_s']} s, 1-min load {rec['load_1min']['mean']}", flush=True)
                PAGE.write_text(render())
            return 0
        text = render()
        if args.check:
            if not PAGE.exists() or PAGE.read_text() != text:
                print(f"{PAGE} is out of date: run python -m mpidl.claims page", file=sys.stderr)
                return 1
            return 0
        PAGE.write_text(text)
        return 0
    except ClaimsError as e:
        print(f"claims: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
