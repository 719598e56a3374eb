"""pdADMM benchmarks (issue 11): per-iteration time and its breakdown, the GEMM floor, peak RSS,
threads, ranks, messages, a layer-parallel time model, SGD at equal wall time, and plots.

Timing commands (run each under ``flock -x /work/bench.lock``; record ``uptime``)::

    python benchmarks/bench_pdadmm.py iter --threads 1 --out benchmarks/results/pdadmm_iter_t1.json
    python benchmarks/bench_pdadmm.py iter --threads 2 --out benchmarks/results/pdadmm_iter_t2.json
    mpiexec -n 2 python benchmarks/bench_pdadmm.py iter --out benchmarks/results/pdadmm_iter_p2.json
    mpiexec -n 2 python benchmarks/bench_pdadmm.py msg --out benchmarks/results/pdadmm_msg.json
    python benchmarks/bench_pdadmm.py model --iter benchmarks/results/pdadmm_iter_t1.json \
        --msg benchmarks/results/pdadmm_msg.json --out benchmarks/results/pdadmm_model.json

Issue 24 (memory and measured layer parallelism; medians over interleaved rounds)::

    python benchmarks/bench_pdadmm.py scale --L 2 3 --ranks 1 2 3 --rounds 3 --out benchmarks/results/pdadmm_scale.json
    python benchmarks/bench_pdadmm.py scale --L 3 --ranks 1 3 --poll-us 0 100 --rounds 2 --out ..._wait_L3.json
    python benchmarks/bench_pdadmm.py mem --steps 1 --features 196 784 [--tree EXPORT_OF_MAIN]

Accuracy (shared lock): the curves come from ``mpidl run jobs/configs/pdadmm_fmnist.toml``
(results.h5; ``curves`` collects them into one JSON), and ``sgd`` trains the same MLP with
minibatch SGD for a wall-time budget (exclusive lock: 50 x the measured s/iteration)::

    python benchmarks/bench_pdadmm.py sgd --seconds 150 --out benchmarks/results/pdadmm_sgd.json
    python benchmarks/bench_pdadmm.py curves --runs RUN_DIR [RUN_DIR ...] --out benchmarks/results/pdadmm_acc_curves.json
    python benchmarks/bench_pdadmm.py plot --runs RUN_DIR [...] --iter-s S [...] --sgd SGD_JSON [...]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np


def _cfg(args):
    from mpidl import config
    over = ["algorithm.name=" + ('"pdadmm-q"' if args.quantize else '"pdadmm"'),
            f"model.hidden={[args.width] * (args.layers - 1)}", "run.batch_size=0",
            f"algorithm.downsample={2 if args.features == 196 else 1}",
            f"algorithm.threads_per_rank={args.threads}", "algorithm.rho=1e-4", "algorithm.nu=1e-4", "algorithm.tau0=1.0",
            "data.eval_samples=1000", f'data.dataset="{args.dataset}"']
    if getattr(args, "poll_us", None) is not None:
        over.append(f"algorithm.wait_poll_us={args.poll_us}")
    if args.quantize:
        over.append("algorithm.quantize_p=true")
    return config.load(None, over)


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cmd_iter(args):
    """Per-iteration time (median), per-update and per-layer breakdown, GEMM floor, peak RSS."""
    from mpi4py import MPI

    from mpidl.algorithms.pdadmm_layout import setup_layers
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    rss0 = _rss_mb()
    s = setup_layers(_cfg(args), world)
    algo, state = s.algo, s.state
    rss_setup = _rss_mb()
    state, _ = algo.step(0, state, None, s.comm)            # warm-up (JIT load, page faults)
    for k in algo.times:
        algo.times[k] = 0.0
    algo.layer_times[:] = 0
    b0 = s.comm.bytes_sent
    walls, cpus = [], []
    for k in range(1, args.iters + 1):
        world.Barrier()
        t, c = time.perf_counter(), time.process_time()
        state, _ = algo.step(k, state, None, s.comm)
        cpus.append(time.process_time() - c)
        world.Barrier()
        walls.append(time.perf_counter() - t)
    nbytes = (s.comm.bytes_sent - b0) / args.iters
    rss_steps = _rss_mb()
    floor = _gemm_floor(algo, args.iters) if args.floor else None
    ev, _ = s.evaluate(state)
    out = {"rank": rank, "size": size, "layers": algo.L, "dims": algo.dims, "block": [algo.l0, algo.l1],
           "threads": args.threads, "iters": args.iters, "iter_s": walls,
           "median_iter_s": statistics.median(walls), "iter_cpu_s": cpus,
           "median_iter_cpu_s": statistics.median(cpus),
           "update_s": {k: v / args.iters for k, v in algo.times.items()},
           "layer_s": (algo.layer_times / args.iters).tolist(), "gemm_floor_s": floor,
           "bytes_per_iter": nbytes, "peak_rss_mb": rss_steps, "peak_rss_mb_with_floor": _rss_mb(),
           "rss_before_setup_mb": rss0,
           "rss_after_setup_mb": rss_setup, "test_acc_after": ev["test_acc"],
           "quantize": bool(args.quantize), "load": os.getloadavg()}
    allout = world.gather(out, root=0)
    s.close()
    if rank == 0:
        res = {"ranks": allout, "median_iter_s": max(o["median_iter_s"] for o in allout),
               "bytes_per_iter_total": sum(o["bytes_per_iter"] for o in allout),
               "peak_rss_mb_max": max(o["peak_rss_mb"] for o in allout), "load": os.getloadavg(),
               "argv": sys.argv[1:]}
        _write(args.out, res)


def _gemm_floor(algo, reps):
    """Median process CPU time of the GEMMs of one iteration (as pdadmm.py runs them), standalone.

    Per layer: W step R^T p, then p^T p and p W^T (wide layers; X^T X is cached for layer 1)
    or p G^T (narrow); p step (l > 1) R W, G^T G and p W^T (wide) or 2 x R W and G W^T (narrow).
    """
    tot = 0.0
    for lay in algo._layers:
        n_in, n_out = lay.p.shape[1], lay.R.shape[1]
        G = np.ones((algo.N, n_in), algo.dtype)
        Gw = np.ones((n_out, n_in), algo.dtype)
        out = np.empty((algo.N, n_out), algo.dtype)
        ops = [lambda: np.matmul(lay.R.T, lay.p)]
        if lay.l > 0 and n_out < n_in:
            ops += [lambda: np.matmul(lay.p, Gw.T, out=out)]
        else:
            ops += [lambda: np.matmul(lay.p, lay.W.T, out=out)]
            if lay.l > 0:
                ops += [lambda: np.matmul(lay.p.T, lay.p)]
        if lay.l > 0:
            ops += [lambda: np.matmul(lay.R, lay.W, out=G)]
            if n_in <= n_out:
                ops += [lambda: np.matmul(G.T, G), lambda: np.matmul(lay.p, lay.W.T, out=out)]
            else:
                ops += [lambda: np.matmul(lay.R, lay.W, out=G), lambda: np.matmul(G, lay.W.T, out=out)]
        for op in ops:
            ts = []
            for _ in range(max(reps, 3)):
                t = time.process_time()
                op()
                ts.append(time.process_time() - t)
            tot += statistics.median(ts)
    return tot


def cmd_msg(args):
    """Time of one N x w message (float32 and uint16) between ranks 0 and 1 of the path."""
    from mpi4py import MPI

    from mpidl import topology as T
    from mpidl.comm import GraphComm
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size != 2:
        raise SystemExit("msg needs exactly 2 ranks")
    res = {}
    with GraphComm(world, T.path(2)) as gc:
        for name, dt in (("float32", np.float32), ("uint16", np.uint16)):
            a = np.ones((args.n, args.width), dt)
            b = np.empty_like(a)
            ts = []
            for _ in range(args.reps):
                world.Barrier()
                t = time.perf_counter()
                if rank == 0:
                    gc.start_exchange({1: a}, {}, tag=5).wait()
                else:
                    gc.start_exchange({}, {0: b}, tag=5).wait()
                world.Barrier()
                ts.append(time.perf_counter() - t)
            res[name] = {"bytes": a.nbytes, "median_s": statistics.median(ts), "all_s": ts}
    if rank == 0:
        res.update(load=os.getloadavg(), n=args.n, width=args.width, transport="MPICH shared memory, one node")
        _write(args.out, res)


def cmd_model(args):
    """Layer-parallel time model for L = 3, 5, 10 ranks from measured per-layer and message times."""
    it = json.load(open(args.iter))["ranks"][0]
    msg = json.load(open(args.msg))
    lt = it["layer_s"]
    if len(lt) != 3:
        raise SystemExit("model needs the per-layer times of the 1-rank L = 3 run")
    first, hidden, last = lt
    rows = []
    for net in args.L:
        serial = first + (net - 2) * hidden + last
        for label, m in (("measured shared-memory message", msg["float32"]["median_s"]),
                         (f"{args.gbps:g} GB/s network", msg["float32"]["bytes"] / (args.gbps * 1e9))):
            par = max(first, hidden, last) + m       # q message not overlapped; p overlaps W/b/z
            rows.append({"L": net, "message": label, "serial_s": serial, "message_s": m,
                         "parallel_s": par, "speedup": serial / par})
    _write(args.out, {"layer_s": lt, "rows": rows, "iter": args.iter, "msg": args.msg})


def cmd_sgd(args):
    """Minibatch SGD on the same MLP (same torch init) for a time budget; test accuracy curve.

    ``--clock wall`` (default): the budget is the wall time of the training steps (run it under
    the exclusive lock, like the pdADMM timing, so both clocks are wall seconds on an idle core);
    ``--clock cpu``: process CPU seconds.  Evaluation time is not counted; both clocks are logged.
    """
    import torch

    from mpidl.algorithms.pdadmm_layout import downsample
    from mpidl.data import load_dataset
    from mpidl.models import build_model
    torch.set_num_threads(args.threads)
    ds = load_dataset("fashion-mnist")
    f = 2 if args.features == 196 else 1
    X = torch.from_numpy(downsample(ds.x_train, f).astype(np.float32))
    Xt = torch.from_numpy(downsample(ds.x_test, f).astype(np.float32))
    y, yt = torch.from_numpy(ds.y_train), torch.from_numpy(ds.y_test)
    model = build_model("mlp", (X.shape[1],), 10, (500, 500), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    curve, spent, epoch = [], 0.0, 0
    wall = cpu = 0.0
    next_eval = 0.0
    while spent < args.seconds:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), args.batch):
            t, c = time.perf_counter(), time.process_time()
            idx = perm[i:i + args.batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            wall += time.perf_counter() - t
            cpu += time.process_time() - c
            spent = wall if args.clock == "wall" else cpu
            if spent >= next_eval or spent >= args.seconds:
                with torch.no_grad():
                    acc = float((model(Xt).argmax(1) == yt).float().mean())
                curve.append({"train_wall_s": wall, "train_cpu_s": cpu, "epoch": epoch + i / len(y),
                              "test_acc": acc})
                next_eval += args.seconds / args.evals
            if spent >= args.seconds:
                break
        epoch += 1
    _write(args.out, {"seconds": args.seconds, "clock": args.clock, "lr": args.lr, "batch": args.batch, "features": X.shape[1],
                      "curve": curve, "final_test_acc": curve[-1]["test_acc"], "load": os.getloadavg()})


def cmd_plot(args):
    """Test accuracy vs iteration (and vs wall time with SGD) of finished runs -> docs/img/."""
    import h5py
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    iter_s = args.iter_s * len(args.runs) if len(args.iter_s) == 1 else args.iter_s
    if len(iter_s) != len(args.runs):
        raise SystemExit("--iter-s needs one value, or one per run")
    for run, its in zip(args.runs, iter_s):
        with h5py.File(os.path.join(run, "results.h5")) as h:
            step, acc = h["eval/step"][()], h["eval/test_acc"][()]
        label = os.path.basename(run.rstrip("/"))
        if args.max_step:
            keep = step <= args.max_step
            step, acc = step[keep], acc[keep]
        a1.plot(step, acc, marker=".", label=label)
        a2.plot(step * its, acc, marker=".", label=label)
        print(label, "steps", list(step), "acc", [round(float(v), 4) for v in acc])
    for path in args.sgd:
        d = json.load(open(path))
        key = "train_wall_s" if d.get("clock") == "wall" else "train_cpu_s"
        pts = [c for c in d["curve"] if c[key] >= 1.0]          # the log axis: skip the untrained start
        a2.plot([c[key] for c in pts], [c["test_acc"] for c in pts], marker=".",
                label=f"SGD (same MLP, {d.get('features', 196)} features)")
    a1.set_xlabel("pdADMM iteration (full batch)")
    a2.set_xlabel(args.xlabel)
    a2.set_xscale("log")
    for a in (a1, a2):
        a.set_ylabel("test accuracy")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


def cmd_curves(args):
    """The evaluation rows of finished runs (results.h5) -> one small JSON (the curves of the doc)."""
    import h5py
    out = {"note": args.note}
    for run in args.runs:
        with h5py.File(os.path.join(run, "results.h5")) as h:
            ev = h["eval"]
            d = {k: [round(float(v), 6) for v in ev[k][()]] for k in
                 ("step", "test_acc", "test_loss", "train_acc_forward", "rho", "wall") if k in ev}
            d["config"] = h.attrs.get("config", "")
            if isinstance(d["config"], bytes):
                d["config"] = d["config"].decode()
        out[os.path.basename(run.rstrip("/"))] = d
    _write(args.out, out)


def cmd_tables(args):
    """Markdown tables (stdout) from the JSON results of run_pdadmm.sh."""
    R = args.dir

    def load(name):
        path = os.path.join(R, name)
        return json.load(open(path)) if os.path.exists(path) else None
    t1, t2, p2, t784 = (load(f"pdadmm_iter_{k}.json") for k in ("t1", "t2", "p2", "784_t1"))
    print("| run | median s/iter | p | W | b | z | q | u | wait | GEMM floor s | peak RSS MB | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, d in (("196 feat, 1 rank, 1 thread", t1), ("196 feat, 1 rank, 2 threads", t2),
                     ("196 feat, 2 ranks x 1 thread", p2), ("784 feat, 1 rank, 1 thread", t784)):
        if d is None:
            continue
        r0 = max(d["ranks"], key=lambda o: o["median_iter_s"])
        u = r0["update_s"]
        fl = r0["gemm_floor_s"]
        print(f"| {label} | {d['median_iter_s']:.2f} | " + " | ".join(f"{u[k]:.2f}" for k in
              ("p", "W", "b", "z", "q", "u", "wait")) + f" | {fl:.2f} | " if fl else
              f"| {label} | {d['median_iter_s']:.2f} | " + " | ".join(f"{u[k]:.2f}" for k in
              ("p", "W", "b", "z", "q", "u", "wait")) + " | - | ", end="")
        print(f"{d['peak_rss_mb_max']:.0f} | {d['load'][0]:.1f} |")
    for name in ("pdadmm_bytes_p3.json", "pdadmm_bytes_q_p3.json"):
        d = load(name)
        if d:
            print(f"\n{name}: bytes/iteration (all ranks) {d['bytes_per_iter_total']:.0f}")
    m = load("pdadmm_model.json")
    if m:
        print("\n| L | message | serial s/iter | message s | parallel s/iter | speed-up |")
        print("|---|---|---|---|---|---|")
        for r in m["rows"]:
            print(f"| {r['L']} | {r['message']} | {r['serial_s']:.2f} | {r['message_s']:.3f} | "
                  f"{r['parallel_s']:.2f} | {r['speedup']:.2f} |")
        print("per-layer s:", [round(v, 3) for v in m["layer_s"]])
    g = load("pdadmm_msg.json")
    if g:
        print("msg:", {k: (g[k]["bytes"], round(g[k]["median_s"], 4)) for k in ("float32", "uint16")})



def _uptime():
    import subprocess
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cmd_scale(args):
    """Measured layer parallelism: one iteration of the same net at 1 rank and at P ranks, side by side.

    For every net depth L in ``--L`` and every rank count P in ``--ranks`` (P <= L), each round
    starts ``mpiexec -n P bench_pdadmm.py iter --layers L`` once; the rounds interleave the
    configurations (round 1: all of them, round 2: all of them, ...), so that a change of the
    machine's load hits every configuration alike.  Per configuration: the medians over rounds of
    the median iteration wall time (slowest rank), each rank's waits and CPU time, and the
    model's prediction (``cmd_model``'s formula) from the 1-rank run's per-layer times.
    """
    import subprocess
    import tempfile
    confs = [(L, P) for L in args.L for P in args.ranks if P <= L]
    if args.poll_us:                        # A/B of the wait: every multi-rank configuration with each value
        confs = [(L, P, w) for L, P in confs for w in (args.poll_us if P > 1 else [None])]
    else:
        confs = [(L, P, None) for L, P in confs]

    def key(L, P, w=None):
        return f"L{L}_P{P}" + ("" if w is None else f"_poll{w:g}")
    runs = {key(*c): [] for c in confs}
    log = []
    tmp = tempfile.mkdtemp(prefix="pdadmm_scale_")
    if args.from_dir:                       # the per-run JSONs of an interrupted run (complete rounds only)
        import glob
        n = min(len(glob.glob(os.path.join(args.from_dir, key(*c) + "_*.json"))) for c in confs)
        for rnd in range(n):
            for c in confs:
                runs[key(*c)].append(json.load(open(os.path.join(args.from_dir, f"{key(*c)}_{rnd}.json"))))
        args.rounds = 0
    for rnd in range(args.rounds):
        order = confs if rnd % 2 == 0 else confs[::-1]
        for L, P, w in order:
            out = os.path.join(tmp, f"{key(L, P, w)}_{rnd}.json")
            cmd = ["mpiexec", "-n", str(P), sys.executable, os.path.abspath(__file__), "iter", "--layers", str(L),
                   "--iters", str(args.iters), "--no-floor", "--width", str(args.width), "--out", out]
            if args.quantize:
                cmd.append("--quantize")
            if w is not None:
                cmd += ["--poll-us", str(w)]
            before = _uptime()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            after = _uptime()
            d = json.load(open(out))
            runs[key(L, P, w)].append(d)
            log.append({"round": rnd, "L": L, "P": P, "poll_us": w, "median_iter_s": d["median_iter_s"],
                        "uptime_before": before, "uptime_after": after})
            print(f"round {rnd} {key(L, P, w)}: {d['median_iter_s']:.3f} s/iter  ({after})", file=sys.stderr)
    med = statistics.median
    table = []
    for L, P, w in confs:
        rs = runs[key(L, P, w)]
        one = runs.get(key(L, 1))
        row = {"L": L, "P": P, "poll_us": w, "iter_s": [r["median_iter_s"] for r in rs],
               "median_iter_s": med([r["median_iter_s"] for r in rs]),
               "ranks": [{"rank": i, "block": rs[0]["ranks"][i]["block"],
                          "iter_cpu_s": med([r["ranks"][i]["median_iter_cpu_s"] for r in rs]),
                          "wait_s": med([r["ranks"][i]["update_s"]["wait"] for r in rs]),
                          "compute_s": med([sum(v for k, v in r["ranks"][i]["update_s"].items() if k != "wait")
                                            for r in rs]),
                          "layer_s": [med([r["ranks"][i]["layer_s"][j] for r in rs])
                                      for j in range(len(rs[0]["ranks"][i]["layer_s"]))],
                          "bytes_per_iter": rs[0]["ranks"][i]["bytes_per_iter"],
                          "peak_rss_mb": max(r["ranks"][i]["peak_rss_mb"] for r in rs)} for i in range(P)]}
        if one:
            lt = [med([r["ranks"][0]["layer_s"][j] for r in one]) for j in range(L)]
            row["speedup"] = med([r["median_iter_s"] for r in one]) / row["median_iter_s"]
            # CPU time: the 1-rank run's over the busiest rank's (the work, without the load's share)
            row["cpu_speedup"] = med([r["ranks"][0]["median_iter_cpu_s"] for r in one]) / \
                max(x["iter_cpu_s"] for x in row["ranks"])
            # the model: a rank's time = the sum of its layers' 1-rank times; the slowest rank sets
            # the pace; + one message time when P > 1 (the q message is not overlapped)
            blocks = [r["block"] for r in row["ranks"]]
            par = max(sum(lt[a:b]) for a, b in blocks) + (args.msg_s if P > 1 else 0.0)
            row["model_serial_s"] = sum(lt)
            row["model_parallel_s"] = par
            row["model_speedup"] = sum(lt) / par
        table.append(row)
    res = {"rows": table, "log": log, "rounds": len(next(iter(runs.values()))), "iters": args.iters, "cores": os.cpu_count(),
           "msg_s": args.msg_s, "argv": sys.argv[1:]}
    _write(args.out, res)
    print("| net (L) | ranks | poll us | s/iter (median of rounds) | speed-up | CPU speed-up | model | "
          "per rank: compute / wait / CPU s |", file=sys.stderr)
    for r in table:
        pr = "; ".join(f"r{x['rank']} {x['compute_s']:.2f}/{x['wait_s']:.2f}/{x['iter_cpu_s']:.2f}" for x in r["ranks"])
        print(f"| {r['L']} | {r['P']} | {r['poll_us']} | {r['median_iter_s']:.2f} | {r.get('speedup', float('nan')):.2f} | "
              f"{r.get('cpu_speedup', float('nan')):.2f} | {r.get('model_speedup', float('nan')):.2f} | {pr} |",
              file=sys.stderr)


def _maxrss_kib(text):
    for line in text.splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1])
    raise RuntimeError("no 'Maximum resident set size' in /usr/bin/time -v output")


def cmd_mem(args):
    """Peak RSS per rank of ``mpidl run`` (``/usr/bin/time -v``): pdadmm vs pdadmm-q, and resume vs straight.

    One invocation runs every case, interleaved over ``--rounds``: the shipped Fashion-MNIST configs with
    ``run.steps = --steps`` and a checkpoint at the end; the resume case first runs ``--steps`` steps,
    then resumes to ``2 --steps`` (``--resume auto``) and is compared with a straight run of
    ``2 --steps`` steps.  ``--tree DIR`` runs the same cases with the code of DIR first on PYTHONPATH
    (an export of another commit) for a before/after table.
    """
    import shutil
    import subprocess
    import tempfile
    root = tempfile.mkdtemp(prefix="pdadmm_mem_")
    cfgdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", "configs")
    n = args.steps
    cases = []
    for feat in args.features:
        for algo in args.algos:
            cfg = os.path.join(cfgdir, "pdadmm_q_fmnist.toml" if algo == "pdadmm-q" else "pdadmm_fmnist.toml")
            base = [f"algorithm.downsample={2 if feat == 196 else 1}", f"run.checkpoint_every={n}",
                    f"run.eval_every={n}", f"run.log_every={n}"]
            cases.append((f"{algo} {feat}: straight {2 * n} steps", cfg, base + [f"run.steps={2 * n}"], None))
            cases.append((f"{algo} {feat}: first leg {n} steps + resumed leg to {2 * n}", cfg,
                          base + [f"run.steps={n}"], base + [f"run.steps={2 * n}"]))
    trees = [("this", None)] + ([("before", args.tree)] if args.tree else [])
    rows, serial = {}, 0
    for rnd in range(args.rounds):
        for tname, tree in (trees if rnd % 2 == 0 else trees[::-1]):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if tree:
                env["PYTHONPATH"] = os.path.abspath(tree) + os.pathsep + env.get("PYTHONPATH", "")
            for label, cfg, sets, resume_sets in cases:
                if tree and not any(label.split(":")[0].endswith(f" {f}") for f in args.tree_features):
                    continue
                serial += 1
                out = os.path.join(root, f"r{rnd}_{tname}_{serial}")
                legs = [sets] + ([resume_sets] if resume_sets else [])
                kib = []
                for i, leg in enumerate(legs):
                    cmd = ["mpiexec", "-n", str(args.ranks), "/usr/bin/time", "-v", sys.executable, "-m", "mpidl",
                           "run", cfg, "--set", f'run.out="{out}"'] + \
                          [a for s in leg for a in ("--set", s)] + (["--resume", "auto"] if i else [])
                    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if p.returncode:
                        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
                    per_rank = [int(l.split(":")[1]) for l in p.stderr.splitlines()
                                if "Maximum resident set size" in l]
                    kib.append(max(per_rank))
                shutil.rmtree(out, ignore_errors=True)
                key = f"{tname}: {label}"
                rows.setdefault(key, []).append(kib)
                print(f"round {rnd} {key}: {kib} KiB (max over ranks)  {_uptime()}", file=sys.stderr)
    res = {"rows": {k: {"kib": v, "max_kib": [max(x[i] for x in v) for i in range(len(v[0]))]}
                    for k, v in rows.items()},
           "ranks": args.ranks, "steps": n, "rounds": args.rounds, "load": os.getloadavg(), "argv": sys.argv[1:]}
    _write(args.out, res)


def _write(path, obj):
    text = json.dumps(obj, indent=1)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("iter")
    q.add_argument("--features", type=int, default=196, choices=(196, 784))
    q.add_argument("--dataset", default="fashion-mnist")
    q.add_argument("--layers", type=int, default=3)
    q.add_argument("--width", type=int, default=500)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--iters", type=int, default=3)
    q.add_argument("--quantize", action="store_true")
    q.add_argument("--poll-us", type=float, default=None, help="algorithm.wait_poll_us (0: MPI's blocking wait)")
    q.add_argument("--no-floor", dest="floor", action="store_false")
    q.add_argument("--out", default="")
    q = sub.add_parser("msg")
    q.add_argument("--n", type=int, default=60000)
    q.add_argument("--width", type=int, default=500)
    q.add_argument("--reps", type=int, default=5)
    q.add_argument("--out", default="")
    q = sub.add_parser("model")
    q.add_argument("--iter", required=True)
    q.add_argument("--msg", required=True)
    q.add_argument("--L", type=int, nargs="+", default=[3, 5, 10])
    q.add_argument("--gbps", type=float, default=12.5)
    q.add_argument("--out", default="")
    q = sub.add_parser("sgd")
    q.add_argument("--seconds", type=float, required=True)
    q.add_argument("--features", type=int, default=196, choices=(196, 784))
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--lr", type=float, default=0.05)
    q.add_argument("--batch", type=int, default=128)
    q.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    q.add_argument("--evals", type=int, default=20, help="evaluations over the budget")
    q.add_argument("--out", default="")
    q = sub.add_parser("plot")
    q.add_argument("--runs", nargs="+", required=True)
    q.add_argument("--sgd", nargs="*", default=[])
    q.add_argument("--png", default="docs/img/pdadmm_fmnist_acc.png")
    q.add_argument("--max-step", type=int, default=0, help="plot iterations up to this one (0: all)")
    q.add_argument("--xlabel", default="seconds on one core (pdADMM: iterations x measured s/iteration; SGD: measured)")
    q.add_argument("--iter-s", type=float, nargs="+", required=True,
                   help="measured seconds per iteration (1 rank, 1 thread), one value or one per run")
    q = sub.add_parser("curves")
    q.add_argument("--runs", nargs="+", required=True)
    q.add_argument("--note", default="")
    q.add_argument("--out", required=True)
    q = sub.add_parser("scale")
    q.add_argument("--L", type=int, nargs="+", default=[2, 3], help="net depths (layers)")
    q.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    q.add_argument("--rounds", type=int, default=3)
    q.add_argument("--iters", type=int, default=3)
    q.add_argument("--width", type=int, default=500)
    q.add_argument("--quantize", action="store_true")
    q.add_argument("--msg-s", type=float, default=0.0163, help="one N x 500 float32 message (pdadmm_msg.json)")
    q.add_argument("--from-dir", default="", help="aggregate the per-run JSONs left in this folder")
    q.add_argument("--poll-us", type=float, nargs="*", default=[],
                   help="A/B of algorithm.wait_poll_us: run every multi-rank configuration with each value")
    q.add_argument("--out", default="")
    q = sub.add_parser("mem")
    q.add_argument("--algos", nargs="+", default=["pdadmm", "pdadmm-q"])
    q.add_argument("--features", type=int, nargs="+", default=[196, 784])
    q.add_argument("--steps", type=int, default=2)
    q.add_argument("--ranks", type=int, default=1)
    q.add_argument("--rounds", type=int, default=1)
    q.add_argument("--tree", default="", help="also run the cases with this source tree first on PYTHONPATH")
    q.add_argument("--tree-features", type=int, nargs="+", default=[196], help="the --tree cases: these features")
    q.add_argument("--out", default="")
    q = sub.add_parser("tables")
    q.add_argument("--dir", default="benchmarks/results")
    args = p.parse_args(argv)
    {"tables": cmd_tables, "iter": cmd_iter, "msg": cmd_msg, "model": cmd_model, "sgd": cmd_sgd, "plot": cmd_plot,
     "curves": cmd_curves, "scale": cmd_scale, "mem": cmd_mem}[args.cmd](args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
