"""Peak memory per rank when training from an HDF5 file read lazily, at 1x and 8x the file size.

The same job (cdmsgd, MLP 784-64-10, batch 64, 2 ranks, a fixed number of steps, one evaluation
on 2000 test rows per agent) runs on four files: an HDF5 file and an .npz of the same arrays, at
a base size (1x) and eight times as many training rows (8x).  Each rank reports its peak resident
set (VmHWM from /proc/self/status) at the end of the run.  With HDF5 a rank holds its batch, its
evaluation slices and the chunk cache, so its peak should not grow with the file; the .npz is
loaded whole, so its peak should.

    python benchmarks/bench_data_h5.py --rows 60000 --ranks 2 --steps 60 [--dir /tmp/bench_h5]

Prints one markdown table (docs/benchmarks.md quotes it).

``--speed`` (issue 30) measures training steps/s instead: the job of the issue (cdmsgd, MLP
784-256-128-10, batch 128, 2 ranks, ``--steps 600``, ``--rows 120000`` training rows) on the same
arrays as an ``.npz`` (in memory), an HDF5 file (page-cached) read with and without the reader
thread, with block shuffling, and a memory-mapped ``.npy`` folder; ``--before DIR`` adds the
package found in DIR (``git archive <commit> mpidl | tar -x -C DIR``) reading the same HDF5 file.
The variants run one after the other in ``--rounds`` rounds (alternating, so a change of the
machine's load hits all of them alike); each run reports the driver's training time (step 0 to
the end, one evaluation included) and the table gives medians and the ratio to the ``.npz`` run
of the same round.

    python benchmarks/bench_data_h5.py --speed --rows 120000 --steps 600 --rounds 3 [--before DIR]

``--speed --cold`` drops each file's pages from the page cache (``posix_fadvise(DONTNEED)``)
before every run instead of reading them in first: the reads then come from the disk.
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


def worker(path: str, steps: int, speed=False, sets=()):
    t_start = float(os.environ.get("BENCH_T0", time.time()))   # when the parent launched mpiexec
    from mpi4py import MPI

    from mpidl import config
    from mpidl.driver import train
    world = MPI.COMM_WORLD
    out = f"/tmp/bench_h5_runs/{Path(path).name}"
    if speed:
        opts = ["model.hidden=[256,128]", "run.batch_size=128", "data.eval_samples=1000", "run.threads=1"]
    else:
        opts = ["model.hidden=[64]", "run.batch_size=64", "data.eval_samples=2000"]
    cfg = config.load(None, [f"data.path={path}", "algorithm.name=cdmsgd", f"run.steps={steps}", f'run.out="{out}"',
                             f"run.log_every={steps}", "run.checkpoint_every=100000", 'run.resume="no"',
                             *opts, *sets])
    t0 = time.perf_counter()
    res = train(cfg, world)
    secs = time.perf_counter() - t0
    peaks = world.gather(peak_rss_mib(), root=0)
    if world.Get_rank() == 0:
        # start-up: launch to the driver's step 0 (the run's own clock starts just before step 0)
        startup = time.time() - t_start - res["time"]
        print("RESULT " + json.dumps({"peaks": peaks, "seconds": secs, "train_s": res["time"], "startup_s": startup,
                                      "test_acc": res["test_acc"]}), flush=True)


def launch(mpiexec, ranks, path, steps, speed=False, sets=(), pythonpath=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_T0=repr(time.time()))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker", str(path), "--steps", str(steps)]
    cmd += (["--speed"] if speed else []) + [f"--set={s}" for s in sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{path} {sets}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line[7:])


def write_npy(d: Path, npz: Path) -> Path:
    folder = d / (npz.stem + "_npy")
    if not folder.is_dir():
        folder.mkdir()
        with np.load(npz) as z:
            for k in ("x_train", "y_train", "x_test", "y_test"):
                np.save(folder / f"{k}.npy", z[k])
    return folder


def speed(a, mpiexec):
    d = Path(a.dir)
    h5, npz = write_files(d, a.rows, 1)
    npy = write_npy(d, npz)
    variants = [("npz (in memory)", npz, [], None),
                ("h5, prefetch 0", h5, ["data.prefetch=0"], None),
                ("h5, prefetch 2 (default)", h5, [], None),
                ("h5, block shuffle", h5, ['data.shuffle="block"'], None),
                (".npy folder (mmap)", npy, [], None)]
    if a.before:
        variants.insert(1, ("h5, before (main)", h5, [], a.before))
    files = (h5, npz, *(p for p in npy.iterdir()))
    if a.cold:
        variants = [v for v in variants if v[0] in ("npz (in memory)", "h5, prefetch 0", "h5, prefetch 2 (default)",
                                                     "h5, block shuffle")]
    else:
        for path in files:      # page-cache every file first
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    times = {v[0]: [] for v in variants}
    starts = {v[0]: [] for v in variants}
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        for name, path, sets, pp in variants:
            if a.cold:
                for p in files:
                    fd = os.open(p, os.O_RDONLY)
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
            res = launch(mpiexec, a.ranks, path, a.steps, True, sets, pp)
            times[name].append(res["train_s"])
            starts[name].append(res["startup_s"])
            print(f"round {r} {name}: {res['train_s']:.2f} s, acc {res['test_acc']:.3f}", file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
    base = np.array(times["npz (in memory)"])
    print(f"load average (1 min) before / during rounds: {' / '.join(f'{x:.1f}' for x in load)}")
    print(f"| source | training s (median of {a.rounds}) | steps/s | vs npz (median of per-round ratios) "
          "| start-up s |")
    print("|---|---|---|---|---|")
    for name, *_ in variants:
        t = np.array(times[name])
        print(f"| {name} | {np.median(t):.2f} | {a.steps / np.median(t):.1f} | {np.median(base / t):.2f}x "
              f"| {np.median(starts[name]):.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dir", default="/tmp/bench_h5")
    ap.add_argument("--speed", action="store_true", help="steps/s of HDF5 / .npy against .npz (issue 30)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="--speed: drop the files from the page cache before each run")
    ap.add_argument("--before", default=None, help="--speed: also run the mpidl package in this folder")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", dest="sets", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.speed, a.sets)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    if a.speed:
        return speed(a, mpiexec)
    rows = []
    for factor in (1, 8):
        h5, npz = write_files(d, a.rows, factor)
        for path in (h5, npz):
            r = launch(mpiexec, a.ranks, path, a.steps)
            rows.append((path.suffix, factor, a.rows * factor, os.path.getsize(path) / 2**20, r))
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print("| file | training rows | file MiB | peak RSS per rank (MiB) | start-up s | run s | test acc |")
    print("|---|---|---|---|---|---|---|")
    for suffix, factor, n, mib, r in rows:
        peaks = " / ".join(f"{p:.0f}" for p in r["peaks"])
        print(f"| {suffix} {factor}x | {n} | {mib:.0f} | {peaks} | {r['startup_s']:.1f} | {r['seconds']:.1f} "
              f"| {r['test_acc']:.3f} |")


if __name__ == "__main__":
    main()
