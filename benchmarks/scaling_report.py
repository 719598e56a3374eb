"""Model vs measurement for the validation runs of benchmarks/run_scaling.sh (docs/scaling.md).

    python benchmarks/scaling_report.py OUTDIR RATE_BITS [--json FILE] [--overlap-cdmsgd F]

For each (N, family): the median over repetitions of the seconds per step of "compute" (N
single-rank runs at once: no communication, the same CPU contention; the slowest of the N, since
a synchronous step goes at the slowest rank's pace; fdg: the N-rank run with unshaped links) and of the N-rank run over links shaped to RATE ("measured"), from the results file's train rows (the median of
the 16-step intervals between train rows 16 ... 208; start-up is left out), the bytes per rank per step from the driver's counters,
and the model's prediction t_step(compute, t_comm) with the family's pattern
(benchmarks/scaling_model.py), alpha = 0 (the emulated links add no latency) and the TCP framing
factor.  Error = measured steps/s / modelled steps/s - 1 (+: the run is faster than the model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling_model as M  # noqa: E402

MLP_BYTES = 300_938 * 4          # 784-256-256-128-10, float32
FDG_CUT_ACT = 128 * 256 * 4       # one batch of the 256-wide activation at the cut


def workload(family, stage_bytes=0.0):
    return M.Workload(model_bytes=MLP_BYTES, act_bytes=FDG_CUT_ACT, stage_bytes=stage_bytes)


def per_step(path):
    """(seconds per step, bytes per step summed over ranks): the median over the intervals between
    consecutive train rows (16 steps each; the first row, with start-up, is left out), so a load
    spike on the shared machine moves one interval, not the figure; bytes over the whole span."""
    with h5py.File(path, "r") as f:
        g = f["train"]
        st, wall, b = g["step"][:], g["wall"][:], g["bytes_sent"][:]
    dt = [(wall[i + 1] - wall[i]) / (st[i + 1] - st[i]) for i in range(len(st) - 1)]
    return statistics.median(dt), (b[-1] - b[0]) / float(st[-1] - st[0])


def collect(out):
    rows = {}
    for line in Path(out, "runs.tsv").read_text().splitlines():
        n, fam, cond, rep, load, path = line.split("\t")
        t, b = per_step(path)
        rows.setdefault((int(n), fam), {}).setdefault(cond, []).append(
            {"t": t, "bytes": b / int(n), "rep": rep, "load": [float(x) for x in load.split()]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("rate", type=float, help="link rate in bit/s")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="PNG: measured vs modelled steps/s per family and N")
    ap.add_argument("--overlap", default="cdmsgd=0.36",
                    help="family=f,...: overlap factors (default: CDMSGD's measured by the overlap work)")
    a = ap.parse_args(argv)
    ov = {k: float(v) for k, v in (x.split("=") for x in a.overlap.split(",") if x)}
    fab = M.Fabric("emulated", a.rate, 0.0, M.TCP_WIRE)
    res = []
    for (n, fam), d in sorted(collect(a.out).items()):
        if "shaped" not in d or "compute" not in d:
            continue
        tc_med = statistics.median(r["t"] for r in d["compute"])
        # a synchronous step goes at the pace of the slowest rank: per repetition, the slowest
        # of the N compute processes; then the median over repetitions
        reps = sorted({r["rep"] for r in d["compute"]})
        tc = statistics.median(max(r["t"] for r in d["compute"] if r["rep"] == k) for k in reps)
        tm = statistics.median(r["t"] for r in d["shaped"])
        bm = statistics.median(r["bytes"] for r in d["shaped"])
        loads = [x for c in d.values() for r in c for x in r["load"]]
        stage = 0.0
        if fam == "fdg":      # the largest stage, from the counters: allreduce bytes = counted - p2p
            K = 2
            Mrep = max(n // K, 1)
            ar = bm - FDG_CUT_ACT * 2 * (K - 1) / K
            stage = 0.0 if Mrep == 1 else max(ar * K / (2 * (Mrep - 1) / Mrep) / K, 0.0)
        w = workload(fam)
        link, rounds, counted = M.traffic(fam, n, w)
        tcomm = M.t_comm(fam, n, w, fab)
        f = ov.get(fam, 0.0)
        pred = M.t_step(tc, tcomm, f)
        pred0 = M.t_step(tc, tcomm, 0.0)
        res.append({"n": n, "family": fam, "compute_ms": 1e3 * tc, "compute_median_ms": 1e3 * tc_med, "measured_ms": 1e3 * tm,
                    "comm_model_ms": 1e3 * tcomm, "model_ms": 1e3 * pred, "model0_ms": 1e3 * pred0,
                    "overlap": f, "bytes_rank_step": bm, "bytes_model": counted,
                    "err": pred / tm - 1.0, "err0": pred0 / tm - 1.0,
                    "reps": [len(d["compute"]), len(d["shaped"])],
                    "load": [min(loads), max(loads)], "stage_bytes_from_counters": stage})
    print("| N | family | load | compute ms: slowest (median) | measured ms | model comm ms | model ms (overlap) | "
          "error steps/s | error, overlap 0 | bytes/rank/step counted | model |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res:
        print(f"| {r['n']} | {r['family']} | {r['load'][0]:.0f}-{r['load'][1]:.0f} | {r['compute_ms']:.1f} ({r['compute_median_ms']:.1f}) | "
              f"{r['measured_ms']:.1f} | {r['comm_model_ms']:.1f} | {r['model_ms']:.1f} ({r['overlap']:g}) | "
              f"{r['err']:+.0%} | {r['err0']:+.0%} | {r['bytes_rank_step'] / 1e6:.3f} MB | "
              f"{r['bytes_model'] / 1e6:.3f} MB |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rate_bits": a.rate, "rows": res}, indent=1))
    if a.plot:
        plot(res, a.plot, a.rate)


def plot(res, path, rate):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fams = sorted({r["family"] for r in res})
    fig, axes = plt.subplots(1, len(fams), figsize=(2.6 * len(fams), 3.0), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        rs = sorted((r for r in res if r["family"] == fam), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        ax.plot(ns, [1e3 / r["measured_ms"] for r in rs], "o-", label="measured")
        ax.plot(ns, [1e3 / r["model_ms"] for r in rs], "s--", label="model")
        ax.plot(ns, [1e3 / r["compute_ms"] for r in rs], ":", color="gray", label="compute only")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_ylim(bottom=0)
        ax.set_title(fam, fontsize=9)
        ax.set_xlabel("emulated nodes")
    axes[0][0].set_ylabel("steps/s per rank")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Model vs measured, links {rate / 1e9:g} Gbit/s (benchmarks/scaling_report.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
