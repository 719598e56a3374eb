"""Peak memory per rank when training from an HDF5 file read lazily, at 1x and 8x the file size.

The same job (cdmsgd, MLP 784-64-10, batch 64, 2 ranks, a fixed number of steps, one evaluation
on 2000 test rows per agent) runs on four files: an HDF5 file and an .npz of the same arrays, at
a base size (1x) and eight times as many training rows (8x).  Each rank reports its peak resident
set (VmHWM from /proc/self/status) at the end of the run.  With HDF5 a rank holds its batch, its
evaluation slices and the chunk cache, so its peak should not grow with the file; the .npz is
loaded whole, so its peak should.

    python benchmarks/bench_data_h5.py --rows 60000 --ranks 2 --steps 60 [--dir /tmp/bench_h5]

Prints one markdown table (docs/benchmarks.md quotes it).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def write_files(d: Path, rows: int, factor: int, dim: int = 784, n_test: int = 10000, chunk: int = 256):
    """``d/x{factor}.h5`` and ``d/x{factor}.npz``: rows*factor training rows, written in blocks."""
    import h5py
    n = rows * factor
    h5, npz = d / f"x{factor}.h5", d / f"x{factor}.npz"
    if h5.exists() and npz.exists():
        return h5, npz
    rng = np.random.default_rng(factor)
    w = rng.standard_normal((dim, 10)).astype(np.float32)
    x_all = np.empty((n, dim), np.float32)
    y_all = np.empty(n, np.int64)
    with h5py.File(h5, "w") as f:
        xs = f.create_dataset("x_train", (n, dim), np.float32, chunks=(chunk, dim))
        ys = f.create_dataset("y_train", (n,), np.int64)
        for a in range(0, n, 20000):
            b = min(n, a + 20000)
            x = rng.random((b - a, dim), dtype=np.float32)
            y = np.argmax((x - 0.5) @ w, 1)
            xs[a:b], ys[a:b] = x, y
            x_all[a:b], y_all[a:b] = x, y
        xt = rng.random((n_test, dim), dtype=np.float32)
        yt = np.argmax((xt - 0.5) @ w, 1)
        f.create_dataset("x_test", data=xt, chunks=(chunk, dim))
        f.create_dataset("y_test", data=yt)
    np.savez(npz, x_train=x_all, y_train=y_all, x_test=xt, y_test=yt)
    return h5, npz


def worker(path: str, steps: int):
    from mpi4py import MPI

    from mpidl import config
    from mpidl.driver import train
    world = MPI.COMM_WORLD
    out = f"/tmp/bench_h5_runs/{Path(path).name}"
    cfg = config.load(None, [f"data.path={path}", "model.hidden=[64]", "algorithm.name=cdmsgd",
                             "run.batch_size=64", f"run.steps={steps}", f'run.out="{out}"',
                             "data.eval_samples=2000", f"run.log_every={steps}", "run.checkpoint_every=100000"])
    t0 = time.perf_counter()
    res = train(cfg, world)
    secs = time.perf_counter() - t0
    peaks = world.gather(peak_rss_mib(), root=0)
    if world.Get_rank() == 0:
        print("RESULT " + json.dumps({"peaks": peaks, "seconds": secs, "test_acc": res["test_acc"]}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dir", default="/tmp/bench_h5")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.steps)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    rows = []
    for factor in (1, 8):
        h5, npz = write_files(d, a.rows, factor)
        for path in (h5, npz):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run([mpiexec, "-n", str(a.ranks), sys.executable, __file__, "--worker", str(path),
                                   "--steps", str(a.steps)], capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{path}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            r = json.loads(line[7:])
            rows.append((path.suffix, factor, a.rows * factor, os.path.getsize(path) / 2**20, r))
    print(f"| file | training rows | file MiB | peak RSS per rank (MiB) | run s | test acc |")
    print("|---|---|---|---|---|---|")
    for suffix, factor, n, mib, r in rows:
        peaks = " / ".join(f"{p:.0f}" for p in r["peaks"])
        print(f"| {suffix} {factor}x | {n} | {mib:.0f} | {peaks} | {r['seconds']:.1f} | {r['test_acc']:.3f} |")


if __name__ == "__main__":
    main()
