"""Accuracy of resized runs against the seed spread of uninterrupted 4-rank runs (docs/checkpoints.md).

    mpiexec -n 4 python benchmarks/resize_accuracy.py [--steps 300] [--seeds 3] [--families cdsgd,fdg,...]
                                                      [--out /tmp/resize_acc] [--json results.json]

Per family and seed: an uninterrupted run of ``steps`` steps on 4 ranks; a run of ``steps / 2``
steps on 4 ranks resumed on 2 (ranks 0 and 1, ``[run] resize = "average"``) to ``steps``; and
one of ``steps / 2`` on 2 ranks resumed on 4; and (for context) an uninterrupted run on 2 ranks.  digits, MLP [32], batch 16, ``run.steps`` (so the
step count is the same whatever the size).  Rank 0 prints one Markdown row per family: the
uninterrupted runs' test accuracy on 4 and on 2 ranks (min..max over the seeds) and the resized
runs' (each seed).
"""
import argparse
import json
import logging
import os
import tempfile
import time

from mpi4py import MPI

from mpidl import config
from mpidl.driver import train

FAMILY_KEYS = {
    "cdsgd": ["algorithm.lr=0.05"], "cdmsgd": ["algorithm.lr=0.02", "algorithm.momentum=0.9"],
    "fedavg": ["algorithm.lr=0.05", "algorithm.local_steps=5"],
    "centralized": ["algorithm.lr=0.05", "algorithm.momentum=0.9"],
    "next": ["algorithm.tau=10.0"], "lsgd": ["algorithm.lr=0.05", "algorithm.tau_G=8"],
    "easgd": ["algorithm.lr=0.05", "algorithm.momentum=0.5"],
    "fdg": ["algorithm.stages=2", "algorithm.lr=0.05"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", default=",".join(FAMILY_KEYS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--columns", default="straight,straight2,4->2,2->4",
                    help="which runs: straight (4 ranks), straight2 (2 ranks), 4->2, 2->4")
    a = ap.parse_args()
    cols = a.columns.split(",")
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    if world.Get_size() != 4:
        raise SystemExit("run under mpiexec -n 4")
    logging.basicConfig(level=logging.WARNING)
    out = world.bcast(a.out or (tempfile.mkdtemp(prefix="resize-acc-") if rank == 0 else None))
    two = world.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
    half = a.steps // 2
    rows = {}
    t0 = time.time()
    for fam in a.families.split(","):
        def cfg(name, steps, seed, *extra):
            return config.load(None, ["data.dataset=digits", "model.hidden=[32]", "run.batch_size=16",
                                      f'run.out="{out}"', f"run.name={fam}-{name}-s{seed}", f"run.steps={steps}",
                                      f"run.seed={seed}", "run.log_every=50", f"run.eval_every={a.steps}",
                                      f"run.checkpoint_every={half}", f"algorithm.name={fam}"]
                               + FAMILY_KEYS[fam] + list(extra))
        r = {"straight": [], "straight2": [], "4->2": [], "2->4": []}
        for seed in range(a.seeds):
            if "straight" in cols:
                r["straight"].append(train(cfg("straight", a.steps, seed), world)["test_acc"])
            if "straight2" in cols:
                acc = train(cfg("straight2", a.steps, seed), two)["test_acc"] if two != MPI.COMM_NULL else None
                r["straight2"].append(world.bcast(acc, root=0))
            for label, first, second in (("4->2", world, two), ("2->4", two, world)):
                if label not in cols:
                    continue
                name = "down" if label == "4->2" else "up"
                if first != MPI.COMM_NULL:     # stopped at half (as a preemption would): fdg does not drain
                    train(cfg(name, a.steps, seed), first, max_steps=half)
                acc = None
                if second != MPI.COMM_NULL:
                    acc = train(cfg(name, a.steps, seed, 'run.resume="auto"', 'run.resize="average"'),
                                second)["test_acc"]
                r[label].append(world.bcast(acc, root=0))
        rows[fam] = r
        if rank == 0:
            fmt = lambda v: ", ".join(f"{x:.3f}" for x in v)
            spread = lambda v: f"{min(v):.3f}..{max(v):.3f}" if v else "-"
            print(f"| {fam} | {spread(r['straight'])} | {spread(r['straight2'])} | {fmt(r['4->2'])} | "
                  f"{fmt(r['2->4'])} |", flush=True)
    if rank == 0:
        print(f"total {time.time() - t0:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        if a.json:
            json.dump({"steps": a.steps, "seeds": a.seeds, "rows": rows}, open(a.json, "w"), indent=1)
    if two != MPI.COMM_NULL:
        two.Free()


if __name__ == "__main__":
    main()
