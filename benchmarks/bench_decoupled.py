"""Issue 8 benchmark: the decoupled pipeline (fdg) on Fashion-MNIST.

``python benchmarks/bench_decoupled.py timing [--rounds R] [--steps S] [--json FILE]``
    Side by side in one run, R interleaved rounds, each a fresh ``mpiexec``:
    sequential backprop on 1 rank (1 torch thread, the ``fdg`` 1 x 1 grid, which
    the MPI tests show equals ``centralized``), the pipeline K = 2 on 2 ranks
    (1 thread each), backprop with 2 torch threads on 1 rank, and data-parallel
    M = 2 on 2 ranks (batch 64 per replica: the same 128 samples per step).
    Each launch times S steps after 5 warm-up steps (a barrier before and after;
    rank 0's clock) and reports steps/s, the bytes each rank sent per iteration
    on each link and the bytes of stashed weights / inputs per stage.  Run under
    ``flock -x /work/bench.lock``.

``mpiexec -n P python benchmarks/bench_decoupled.py train NAME [--set ...]``
    One accuracy run (in process: ``setup_grid`` + the algorithm's steps, the
    whole-pipeline evaluation every ``--eval-every`` epochs), optionally on the
    first ``--subset`` samples of each replica's shard; writes
    ``benchmarks/results/decoupled/NAME.json``.

``python benchmarks/bench_decoupled.py layouts``
    Bytes per iteration on each link and the memory of the stashed weights /
    inputs per stage, computed from the sliced models (float32).

``python benchmarks/bench_decoupled.py report``
    Plots (docs/img/bench_decoupled_*.png) and markdown tables (stdout) from the
    JSON files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ACC = RESULTS / "decoupled"

# timing model: an MLP whose two halves cost about the same (cut measured and balanced)
TIMING_MODEL = ["model.name=mlp", "model.hidden=[1152, 1024, 1024, 1024]"]
TIMING_CASES = [
    ("BP, 1 rank, 1 thread", 1, ["algorithm.stages=1", "run.threads=1"]),
    ("FDG K=2, 2 ranks, 1 thread each", 2, ["algorithm.stages=2", "run.threads=1"]),
    ("BP, 1 rank, 2 threads", 1, ["algorithm.stages=1", "run.threads=2"]),
    ("DP M=2 (batch 64 each), 2 ranks, 1 thread each", 2, ["algorithm.stages=1", "run.threads=1",
                                                           "run.batch_size=64"]),
]


def _mpiexec():
    cand = Path(sys.executable).parent / "mpiexec"
    return str(cand) if cand.exists() else "mpiexec"


def _cfg(overrides):
    from mpidl import config
    base = ["algorithm.name=fdg", "data.dataset=fashion-mnist", "run.batch_size=128", "algorithm.lr=0.01",
            "algorithm.momentum=0.9"]
    return config.load(None, base + list(overrides))


def _subset(n):
    """Patch the grid setup to keep the first n samples of each replica's shard."""
    import mpidl.algorithms.fdg_grid as G
    orig = G.load_agent_data

    def load(*a, **kw):
        s = orig(*a, **kw)
        s.x, s.y = s.x[:n], s.y[:n]
        return s
    G.load_agent_data = load


# -- workers (under mpiexec) -----------------------------------------------------
def worker_time(args):
    import numpy as np
    from mpi4py import MPI
    from mpidl.algorithms.fdg_grid import setup_grid
    world = MPI.COMM_WORLD
    warm, S = 5, args.steps
    cfg = _cfg(TIMING_MODEL + args.set + [f"run.steps={warm + S + 10}"])
    sess = setup_grid(cfg, world)
    algo, st, g = sess.algo, sess.state, sess.comm
    for t in range(warm):
        st, _ = algo.step(t, st, sess.oracle, g)
    g.reset_counters()
    sess.mc.barrier()
    t0 = time.perf_counter()
    for t in range(warm, warm + S):
        st, _ = algo.step(t, st, sess.oracle, g)
    sess.mc.barrier()
    dt = time.perf_counter() - t0
    info = dict(rank=world.rank, stage=g.k, replica=g.m, to_next=g.link_bytes[+1] / S,
                to_prev=g.link_bytes[-1] / S, allreduce=g.stage.bytes_sent / S, params=int(st.x.size),
                **algo.stash_bytes(st))
    infos = world.gather(info)
    if world.rank == 0:
        print("RESULT " + json.dumps(dict(steps_per_s=S / dt, seconds=dt, steps=S, cuts=list(sess.cuts),
                                          stage_costs=sess.stage_costs, ranks=infos, describe=sess.describe())))
    sess.close()


def worker_train(args):
    import numpy as np
    from mpi4py import MPI
    from mpidl.algorithms.fdg_grid import setup_grid
    world = MPI.COMM_WORLD
    if args.subset:
        _subset(args.subset)
    cfg = _cfg(args.set)
    sess = setup_grid(cfg, world)
    algo, st, g, spe = sess.algo, sess.state, sess.comm, sess.steps_per_epoch
    every = max(1, int(round(args.eval_every * spe)))
    rows, losses, t0 = [], [], time.perf_counter()
    for t in range(sess.total):
        st, m = algo.step(t, st, sess.oracle, g)
        if m["loss"] is not None:
            losses.append(m["loss"])
        if (t + 1) % every == 0 or t + 1 == sess.total:
            ev, _ = sess.evaluate(st)
            tl = sess.mc.allreduce(np.array([sum(losses), len(losses)], np.float64))
            rows.append(dict(step=t + 1, epoch=(t + 1) / spe, test_acc=float(ev["test_acc"]),
                             test_loss=float(ev["test_loss"]), train_loss=float(tl[0] / max(tl[1], 1)),
                             wall=time.perf_counter() - t0))
            losses = []
            if world.rank == 0:
                print(f"{args.name}: epoch {rows[-1]['epoch']:.2f} test acc {rows[-1]['test_acc']:.4f} "
                      f"train loss {rows[-1]['train_loss']:.4f} ({rows[-1]['wall']:.0f} s)", flush=True)
    if world.rank == 0:
        ACC.mkdir(parents=True, exist_ok=True)
        (ACC / f"{args.name}.json").write_text(json.dumps(dict(
            name=args.name, overrides=args.set, subset=args.subset, ranks=world.size, cuts=list(sess.cuts),
            stage_costs=sess.stage_costs, describe=sess.describe(), rows=rows), indent=1))
    sess.close()


# -- timing driver -------------------------------------------------------------
def timing(args):
    runs = {name: [] for name, _, _ in TIMING_CASES}
    detail = {}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name, n, ov in TIMING_CASES:
            cmd = [_mpiexec(), "-n", str(n), sys.executable, __file__, "_time", "--steps", str(args.steps)]
            for o in ov:
                cmd += ["--set", o]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            res = json.loads(line[0][7:])
            runs[name].append(res["steps_per_s"])
            detail[name] = res
            print(f"round {r}: {name}: {res['steps_per_s']:.2f} steps/s", flush=True)
    load_after = os.getloadavg()
    base = statistics.median(runs[TIMING_CASES[0][0]])
    table = []
    for name, n, ov in TIMING_CASES:
        med = statistics.median(runs[name])
        table.append(dict(case=name, ranks=n, overrides=ov, steps_per_s=runs[name], median=med,
                          vs_bp1=med / base, samples_per_s=med * 128))
        print(f"| {name} | {med:.2f} | {med / base:.2f}x |")
    out = dict(model=TIMING_MODEL, steps=args.steps, rounds=args.rounds, table=table, detail=detail,
               loadavg_before=load_before, loadavg_after=load_after, host=platform.node(),
               cpus=os.cpu_count(), python=platform.python_version())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"load average before {load_before}, after {load_after}; wrote {args.json}")


# -- report ----------------------------------------------------------------------
PLOTS = {"cnn": ("CNN, first 10000 samples, batch 64", ["cnn_BP", "cnn_K2"]),
         "mlp_k": ("MLP 256-256-128, K stages", ["mlp_BP", "mlp_K2", "mlp_K3", "mlp_K4", "mlpdp_M2K2"]),
         "mlp_beta": ("MLP 256-256-128, gradient shrinking beta",
                      ["mlp_K2", "mlpbeta_K2-beta0.5", "mlp_K4", "mlpbeta_K4-beta0.5", "mlpbeta_K4-beta0.25"])}


def report(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(ACC.glob("*.json"))}
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    for key, (title, names) in PLOTS.items():
        rs = [runs[n] for n in names if n in runs]
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rs:
            ax.plot([row["epoch"] for row in r["rows"]], [100 * row["test_acc"] for row in r["rows"]],
                    marker="o", ms=3, label=r["name"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"fdg, Fashion-MNIST: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / f"bench_decoupled_{key}.png", dpi=110)
        plt.close(fig)
        print(f"\n### {title}\n\n| run | ranks | cuts | epochs | final test acc % | best % | final train loss | wall s |"
              "\n|---|---|---|---|---|---|---|---|")
        for r in rs:
            last = r["rows"][-1]
            best = max(row["test_acc"] for row in r["rows"])
            print(f"| {r['name']} | {r['ranks']} | {r['cuts']} | {last['epoch']:.0f} | {100 * last['test_acc']:.2f} "
                  f"| {100 * best:.2f} | {last['train_loss']:.4f} | {last['wall']:.0f} |")


# -- bytes per link and stash memory (computed from the sliced models; no timing) -------------------------
LAYOUTS = [("mlp", (256, 256, 128), 128, {2: [2], 3: [1, 2], 4: [1, 2, 3]}),
           ("mlp", (1152, 1024, 1024, 1024), 128, {2: [2]}),
           ("cnn", (), 64, {2: [2], 3: [1, 2], 4: [1, 2, 4]}),
           ("resnet20", (), 128, {2: [5], 3: [3, 7], 4: [3, 5, 8]})]


def layouts(args):
    import torch
    from mpidl.models import build_model, slice_model
    print("| model | K | cuts | stage k | params | d_k | fwd bytes/iter to k+1 | bwd bytes/iter to k-1 "
          "| w_stash MiB | in_stash MiB |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, hidden, B, by_k in LAYOUTS:
        for K, cuts in by_k.items():
            model = build_model(name, (1, 28, 28), 10, hidden=hidden or (256, 128), seed=0).eval()
            stages = slice_model(model, K, cuts)
            h = torch.zeros(2, 1, 28, 28)
            ins = []
            with torch.no_grad():
                for st in stages:
                    ins.append(h[0].numel())
                    h = st(h)
            for k, st in enumerate(stages):
                P = sum(p.numel() for p in st.parameters())
                d = 2 * (K - 1 - k)
                out = ins[k + 1] if k + 1 < K else 0
                label = f"{name} {list(hidden)}" if hidden else name
                print(f"| {label} | {K} | {cuts} | {k} | {P:,} | {d} | {4 * B * out:,} | "
                      f"{4 * B * ins[k] if k else 0:,} | {4 * d * P / 2**20:.2f} | {4 * d * B * ins[k] / 2**20:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--json", default=str(RESULTS / "decoupled_timing.json"))
    w = sub.add_parser("_time")
    w.add_argument("--steps", type=int, default=30)
    w.add_argument("--set", action="append", default=[])
    a = sub.add_parser("train")
    a.add_argument("name")
    a.add_argument("--set", action="append", default=[])
    a.add_argument("--subset", type=int, default=0)
    a.add_argument("--eval-every", type=float, default=1.0)
    sub.add_parser("report")
    sub.add_parser("layouts")
    args = p.parse_args()
    {"timing": timing, "_time": worker_time, "train": worker_train, "report": report,
     "layouts": layouts}[args.cmd](args)


if __name__ == "__main__":
    main()
