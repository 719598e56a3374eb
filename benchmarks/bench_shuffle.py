"""Accuracy of [data] shuffle = "global" against "block" (issue 30), 3 seeds each.

Two tasks, one rank (cdmsgd on one agent is momentum SGD), the built-in MLP 784-256-128-10,
batch 64, a few epochs:

* Fashion-MNIST (the built-in set, in memory; its file order is already mixed);
* a synthetic 10-class task written **sorted by class** (the worst case for block shuffling:
  a teacher network's labels on Gaussian inputs, 60 000 training rows of 784 floats, as an
  HDF5 file chunked by 256 rows), the way data often arrives (by class, by day, by source).

Blocks are the HDF5 chunk (256 rows) or 1 MiB of rows for data in memory (334 rows of 784
floats); ``--buffer`` blocks are mixed (the default of [data] shuffle_buffer is 8).

    python benchmarks/bench_shuffle.py --epochs 2 --seeds 0 1 2 [--buffer 8]

Prints a markdown table: final test accuracy, mean and range over the seeds.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def sorted_task(path: Path, n=60000, n_test=10000, d=784, seed=0):
    import h5py
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d, 64)) / np.sqrt(d)
    w2 = rng.standard_normal((64, 10))
    x = rng.standard_normal((n + n_test, d)).astype(np.float32)
    y = np.argmax(np.tanh(x @ w1) @ w2, 1).astype(np.int64)
    tr = np.argsort(y[:n], kind="stable")            # training rows sorted by class
    with h5py.File(path, "w") as f:
        f.create_dataset("x_train", data=x[:n][tr], chunks=(256, d))
        f.create_dataset("y_train", data=y[:n][tr])
        f.create_dataset("x_test", data=x[n:], chunks=(256, d))
        f.create_dataset("y_test", data=y[n:])
    return path


def run(sets, seed, epochs, buffer, shuffle, out):
    from mpi4py import MPI

    from mpidl import config
    from mpidl.driver import train
    cfg = config.load(None, [*sets, "algorithm.name=cdmsgd", "algorithm.lr=0.05", "run.batch_size=64",
                             f"run.epochs={epochs}", f"run.seed={seed}", f'data.shuffle="{shuffle}"',
                             f"data.shuffle_buffer={buffer}", f'run.out="{out}"',
                             f"run.name=s{seed}_{shuffle}_{len(sets[0])}", "run.checkpoint_every=100000",
                             'run.resume="no"', "run.log_every=1000", "data.eval_samples=1000"])
    return float(train(cfg, MPI.COMM_SELF)["test_acc"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--buffer", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/bench_shuffle")
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    tasks = {"Fashion-MNIST (file order)": ["data.dataset=fashion-mnist"],
             "synthetic, sorted by class": [f"data.path={sorted_task(d / 'sorted.h5')}"]}
    rows = []
    t0 = time.time()
    for task, sets in tasks.items():
        for shuffle in ("global", "block"):
            accs = [run(sets, s, a.epochs, a.buffer, shuffle, d / "runs") for s in a.seeds]
            print(f"{task} {shuffle}: {accs} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            rows.append((task, shuffle, accs))
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}; {a.epochs:g} epochs, buffer {a.buffer}")
    print("| task | shuffle | test acc per seed | mean | range |")
    print("|---|---|---|---|---|")
    for task, shuffle, accs in rows:
        print(f"| {task} | {shuffle} | {' / '.join(f'{x:.4f}' for x in accs)} | {np.mean(accs):.4f} | "
              f"{max(accs) - min(accs):.4f} |")


if __name__ == "__main__":
    main()
