"""Issue 9 benchmark: LSGD, multi-leader LSGD, async LSGD, EASGD, CDMSGD and centralized SGD.

Three sub-commands:

``mpiexec -n N python benchmarks/bench_lsgd.py run [--epochs E] [--methods a,b] [--model mlp]``
    Trains each method one after the other in this one MPI job, each exactly
    ``mpidl run <config> --set ...`` (same ``config.load`` + ``driver.train``), at
    equal budgets: same model, batch, epochs, learning rate and momentum.  The
    test-accuracy curves (vs steps and wall-clock) and byte counts go to
    ``benchmarks/results/lsgd_curves_n{N}.json``.

``mpiexec -n N python benchmarks/bench_lsgd.py straggler [--rounds R] [--factor 2]``
    Rank 0 is slowed ``factor`` x (it sleeps (factor - 1) x its gradient time
    after each gradient).  Runs sync LSGD for R steps and async LSGD for R rounds,
    reads every worker's own local step count from the final checkpoint, and
    writes throughputs (local steps per second of wall time) and the accuracy
    curves to ``benchmarks/results/lsgd_straggler_n{N}.json``.  A timing run:
    start it under ``flock -x /work/bench.lock``.

``mpiexec -n 2 python benchmarks/bench_lsgd.py window``
    Latency of one publish (``ModelWindow.exchange``) and one lock-free read of
    a float32 model while the window's host computes outside MPI (it sleeps in
    slices of ``--slice`` seconds and touches MPI once per slice), next to the
    same publish done with an MPI exclusive lock (``MPI_Win_lock`` + put).
    Writes ``benchmarks/results/lsgd_window.json``.  A timing run.

``python benchmarks/bench_lsgd.py report``
    Writes docs/bench_lsgd.md, docs/img/bench_lsgd_*.png and the section between
    the lsgd-bench markers of docs/benchmarks.md from the JSON files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"lsgd": "jobs/configs/lsgd_fmnist.toml", "lsgd_multi": "jobs/configs/lsgd_multi_fmnist.toml",
           "lsgd_async": "jobs/configs/lsgd_async_fmnist.toml", "easgd": "jobs/configs/easgd_fmnist.toml",
           "cdmsgd": "jobs/configs/cdmsgd_fmnist.toml", "centralized": "jobs/configs/centralized_fmnist.toml"}
METHOD_SET = {"lsgd": [], "lsgd_multi": ['algorithm.groups="size"', "algorithm.group_size=2"],
              "lsgd_async": [], "easgd": [], "cdmsgd": ['algorithm.momentum_form="heavy-ball"', "topology.name=ring"],
              "centralized": ["topology.name=complete"]}
LABEL = {"lsgd": "LSGD", "lsgd_multi": "LSGD multi-leader (groups of 2)", "lsgd_async": "LSGD async",
         "easgd": "EASGD", "cdmsgd": "CDMSGD (ring)", "centralized": "centralized (data parallel)"}


def _common(args, out, name):
    return [f"model.name={args.model}", f"run.batch_size={args.batch}", f"run.epochs={args.epochs}",
            f"algorithm.lr={args.lr}", f"algorithm.momentum={args.momentum}", f'run.out="{out}"',
            f'run.name="{name}"', "data.eval_samples=1000", f"run.log_every={args.log_every}"]


def _curves(path):
    import h5py
    with h5py.File(path, "r") as f:
        ev = {k: f["eval"][k][()].tolist() for k in f["eval"] if not k.startswith("agent0")}
        tr = {k: f["train"][k][()].tolist() for k in ("step", "bytes_sent", "wall", "train_loss")}
    return ev, tr


def _train(name, overrides, config, world):
    from mpidl import config as C
    from mpidl.driver import train
    cfg = C.load_collective(world, str(ROOT / config), overrides)
    t0 = time.perf_counter()
    res = train(cfg, world)
    return cfg, res, time.perf_counter() - t0


def cmd_run(args):
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    n, rank = world.Get_size(), world.Get_rank()
    out = ROOT / "runs" / "bench_lsgd" / f"n{n}"
    path = RESULTS / f"lsgd_curves_n{n}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for m in args.methods.split(","):
        ov = _common(args, out, m) + METHOD_SET[m] + [f"run.eval_every={args.eval_every}"]
        cfg, res, wall = _train(m, ov, CONFIGS[m], world)
        local = _local_steps(out, m, world) if m == "lsgd_async" else None
        if rank == 0:
            ev, tr = _curves(out / m / "results.h5")
            doc["runs"][m] = dict(method=m, overrides=ov, config=CONFIGS[m], eval=ev, train=tr, wall=wall,
                                  steps=res["steps"], steps_per_epoch=res["steps_per_epoch"],
                                  final_test_acc=res["test_acc"], leader_test_acc=res.get("leader_test_acc"),
                                  center_test_acc=res.get("center_test_acc"), local_steps=local,
                                  load=os.getloadavg(), n=n)
            doc.update(n=n, model=args.model, batch=args.batch, epochs=args.epochs, lr=args.lr,
                       momentum=args.momentum, env=_env())
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1))
            print(f"[bench_lsgd] n={n} {m}: test acc {res['test_acc']:.4f} "
                  f"leader {res.get('leader_test_acc')} wall {wall:.1f}s load {os.getloadavg()}", flush=True)


def _local_steps(out, name, world):
    from mpidl.checkpoint import CheckpointStore
    from mpidl.comm import GraphComm
    from mpidl import topology as T
    with GraphComm(world, T.complete(world.Get_size())) as gc:
        store = CheckpointStore(out / name / "checkpoints", gc)
        state, _ = store.load(store.latest())
    return world.allgather(int(state["algo"]["t"]))


def cmd_straggler(args):
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    n, rank = world.Get_size(), world.Get_rank()
    out = ROOT / "runs" / "bench_lsgd" / f"straggler_n{n}"
    doc = {"n": n, "rounds": args.rounds, "factor": args.factor, "model": args.model, "batch": args.batch,
           "env": _env(), "runs": {}}
    for mode in args.modes.split(","):
        ov = _common(args, out, mode) + [f"run.steps={args.rounds}", f"run.eval_every={args.eval_every}",
                                         "algorithm.slow_rank=0", f"algorithm.slow_factor={args.factor}",
                                         f"algorithm.asynchronous={'true' if mode == 'async' else 'false'}",
                                         f"algorithm.tau_G={args.tau_G}", f"run.checkpoint_every={args.rounds}"]
        load0 = os.getloadavg()
        cfg, res, wall = _train(mode, ov, CONFIGS["lsgd"], world)
        steps = _local_steps(out, mode, world)
        if rank == 0:
            ev, tr = _curves(out / mode / "results.h5")
            doc["runs"][mode] = dict(overrides=ov, wall=wall, train_time=res["time"], local_steps=steps,
                                     throughput=[s / res["time"] for s in steps], eval=ev, train=tr,
                                     load_before=load0, load_after=os.getloadavg(),
                                     final_test_acc=res["test_acc"], leader_test_acc=res.get("leader_test_acc"))
            print(f"[bench_lsgd] straggler n={n} {mode}: local steps {steps} in {res['time']:.1f}s, "
                  f"test acc {res['test_acc']:.4f}, load {os.getloadavg()}", flush=True)
    if rank == 0:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"lsgd_straggler_n{n}{args.suffix}.json").write_text(json.dumps(doc, indent=1))


def cmd_window(args):
    from mpi4py import MPI
    from mpidl import topology as T
    from mpidl.comm import GraphComm, LeaderComm
    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    rows = []
    gc = GraphComm(world, T.ring(n))
    for size in (int(float(v)) for v in args.sizes.split(",")):
        lc = LeaderComm(gc)
        win = lc.window(size, np.float32, "world")
        raw = MPI.Win.Allocate(4 * size if rank == 0 else 0, 4, comm=world)
        x, out = np.full(size, float(rank), np.float32), np.empty(size, np.float32)
        res = {}
        for mode in ("lockfree", "exclusive_lock"):
            world.Barrier()
            pub, rd = [], []
            if rank == 0:       # the host: busy outside MPI, one MPI call per slice
                for _ in range(args.slices):
                    time.sleep(args.slice)
                    world.Iprobe()
            else:
                t_end = time.perf_counter() + args.slices * args.slice * 0.8
                while time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    if mode == "lockfree":
                        win.exchange(x, 1.0, rank, 0, lambda h: True, out)
                        t1 = time.perf_counter()
                        win.read(out)
                        rd.append(time.perf_counter() - t1)
                    else:
                        raw.Lock(0, MPI.LOCK_EXCLUSIVE)
                        raw.Put(x, 0)
                        raw.Unlock(0)
                    pub.append(time.perf_counter() - t0 - (rd[-1] if mode == "lockfree" else 0.0))
            world.Barrier()
            allp = [v for part in world.allgather(pub) for v in part]
            allr = [v for part in world.allgather(rd) for v in part]
            res[mode] = dict(publish_median_ms=1e3 * float(np.median(allp)) if allp else None,
                             publish_count=len(allp),
                             read_median_ms=1e3 * float(np.median(allr)) if allr else None)
        raw.Free()
        lc.close()
        rows.append(dict(values=size, mbytes=4 * size / 1e6, **res))
        if rank == 0:
            print(f"[bench_lsgd] window {size}: {res}", flush=True)
    gc.close()
    if rank == 0:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "lsgd_window.json").write_text(json.dumps(
            dict(n=n, slice_s=args.slice, slices=args.slices, env=_env(), load=os.getloadavg(), rows=rows,
                 lock=args.lock,
                 async_progress=os.environ.get("MPIR_CVAR_ASYNC_PROGRESS", "")), indent=1))


def _env():
    import torch
    from mpi4py import MPI
    return dict(python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
                mpi=MPI.Get_library_version().splitlines()[0], machine=platform.machine(),
                heavy_yield=os.environ.get("MPIR_CVAR_ENABLE_HEAVY_YIELD", ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "straggler"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="mlp")
        s.add_argument("--batch", type=int, default=128)
        s.add_argument("--epochs", type=float, default=4)
        s.add_argument("--lr", type=float, default=0.01)
        s.add_argument("--momentum", type=float, default=0.9)
        s.add_argument("--log-every", type=int, default=10)
        s.add_argument("--eval-every", type=int, default=30)
    sub.choices["run"].add_argument("--methods", default="lsgd,lsgd_multi,easgd,cdmsgd,centralized,lsgd_async")
    st = sub.choices["straggler"]
    st.add_argument("--rounds", type=int, default=300)
    st.add_argument("--factor", type=float, default=2.0)
    st.add_argument("--tau-G", dest="tau_G", type=int, default=16)
    st.add_argument("--modes", default="sync,async")
    st.add_argument("--suffix", default="")
    w = sub.add_parser("window")
    w.add_argument("--sizes", default="1e4,1e5,1e6")
    w.add_argument("--slice", type=float, default=0.05)
    w.add_argument("--slices", type=int, default=20)
    w.add_argument("--lock", default="exclusive", help="the bench.lock mode it ran under (recorded)")
    sub.add_parser("report")
    args = p.parse_args(argv)
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "straggler":
        cmd_straggler(args)
    elif args.cmd == "window":
        cmd_window(args)
    else:
        from bench_lsgd_report import report
        report()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
