"""Kernel benchmark (issue 5): Numba kernels vs their NumPy twins, achieved bandwidth.

    python benchmarks/bench_kernels.py --out docs/bench_kernels.md [--quick]

For every memory-bound kernel at n = 1e5, 1e6, 4e6 (float32, float64) it reports
the median time of the public Numba kernel and of its NumPy twin
(``tests/reference``), their ratio, and the achieved bandwidth

    GB/s = compulsory bytes (each input read once + each output written once) / median time

against this machine's copy bandwidth, measured in the same run with
``np.copyto`` on a 256 MiB array and counted the same way (read + write,
write-allocate traffic not counted on either side).  It also times the
block-parallel surrogate solves with 1 vs 2 Numba threads.  Times are medians
over repeats after a JIT warm-up (15 repeats for the kernels, 5 for the NumPy
twins); each repeat runs the call often enough to last >= 2 ms.  The public functions are timed (validation included), with
``out=`` preallocated for both the kernel and the twin.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import numba  # noqa: E402

from mpidl import kernels as K  # noqa: E402
from mpidl.kernels import _flags  # noqa: E402
from reference import kernels as ref_mix  # noqa: E402
from reference import loss_kernels as ref_loss  # noqa: E402
from reference import prox_kernels as ref_prox  # noqa: E402
from reference import surrogate_kernels as ref_sur  # noqa: E402


def timeit(fn, repeats, min_time=2e-3):
    """(median, min) seconds per call of ``fn()`` over ``repeats`` repeats (after a warm-up call)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_time / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples), min(samples)


def copy_bandwidth(repeats):
    src = np.random.default_rng(0).random(32 * 2**20)      # 256 MiB float64
    dst = np.empty_like(src)
    t, tmin = timeit(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / t / 1e9, 2 * src.nbytes / tmin / 1e9


def cases(n, dtype):
    """(name, numba call, numpy twin call, bytes moved) for one size and dtype."""
    rng = np.random.default_rng(1)
    item = np.dtype(dtype).itemsize
    v, w, g, pi, wt = (rng.standard_normal(n).astype(dtype) for _ in range(5))
    o1, o2, p1, p2 = (np.empty(n, dtype) for _ in range(4))
    recv = rng.standard_normal((2, n)).astype(dtype)
    cw = np.array([0.3, 0.3])
    d = 100
    m = max(1, n // d)
    X = rng.standard_normal((m, d)).astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    s = np.sign(y).astype(dtype)
    s[s == 0] = 1
    wd, gd, rgd = rng.standard_normal(d).astype(dtype), np.empty(d, dtype), np.empty(d, dtype)
    vin = v.copy()
    return [
        ("soft_threshold", lambda: K.soft_threshold(v, 0.5, out=o1),
         lambda: ref_prox.soft_threshold(v, 0.5, out=p1), 2 * n * item),
        ("soft_threshold in place", lambda: K.soft_threshold(vin, 0.0, out=vin),
         lambda: ref_prox.soft_threshold(vin, 0.0, out=vin), 2 * n * item),
        ("prox_l2", lambda: K.prox_l2(v, 0.5, out=o1),
         lambda: ref_prox.prox_l2(v, 0.5, out=p1), 2 * n * item),
        ("linearized_step l1 (w~, z)",
         lambda: K.linearized_step(w, g, pi, 2.0, 0.5, "l1", 0.1, out_wt=o1, out_z=o2),
         lambda: ref_sur.linearized_step(w, g, pi, 2.0, 0.5, "l1", 0.1, out_wt=p1, out_z=p2),
         5 * n * item),
        ("linearized_step l2 (w~, z)",
         lambda: K.linearized_step(w, g, pi, 2.0, 0.5, "l2", 0.1, out_wt=o1, out_z=o2),
         lambda: ref_sur.linearized_step(w, g, pi, 2.0, 0.5, "l2", 0.1, out_wt=p1, out_z=p2),
         5 * n * item),
        ("linearized_step l1 (z only)",
         lambda: K.linearized_step(w, g, pi, 2.0, 0.5, "l1", 0.1, out_wt=o2, out_z=o2),
         lambda: ref_sur.linearized_step(w, g, pi, 2.0, 0.5, "l1", 0.1, out_wt=p2, out_z=p2),
         4 * n * item),
        ("linearized_step l1 (z only, over w)",
         lambda: K.linearized_step(w, g, pi, 2.0, 0.0, "l1", 0.1, out_wt=w, out_z=w),
         lambda: ref_sur.linearized_step(w, g, pi, 2.0, 0.0, "l1", 0.1, out_wt=w, out_z=w),
         4 * n * item),
        ("relax", lambda: K.relax(w, wt, 0.5, out=o1),
         lambda: ref_sur.relax(w, wt, 0.5, out=p1), 3 * n * item),
        ("combine (2 neighbours)", lambda: K.combine(v, recv, 0.4, cw, out=o1),
         lambda: ref_mix.combine(v, recv, 0.4, cw, out=p1), 4 * n * item),
        (f"least_squares (X {m}x{d})", lambda: K.least_squares(wd, X, y, out=gd),
         lambda: ref_loss.least_squares(wd, X, y, out=rgd), (m * d + m) * item),
        (f"logistic (X {m}x{d})", lambda: K.logistic(wd, X, s, out=gd),
         lambda: ref_loss.logistic(wd, X, s, out=rgd), (m * d + m) * item),
    ]


def bench_memory(sizes, repeats, copy_bw, rows):
    for dtype in (np.float32, np.float64):
        for n in sizes:
            for name, fk, fr, nbytes in cases(n, dtype):
                tk, tkmin = timeit(fk, repeats)
                tr, _ = timeit(fr, max(3, repeats // 3))    # the twin only sets the ratio
                gbs = nbytes / tk / 1e9
                gbs_best = nbytes / tkmin / 1e9
                rows.append((name, f"{n:.0e}".replace("e+0", "e"), np.dtype(dtype).name,
                             tk * 1e6, tr * 1e6, tr / tk, gbs, 100 * gbs / copy_bw[0],
                             gbs_best, 100 * gbs_best / copy_bw[1]))
                print(f"{rows[-1][0]:32s} {rows[-1][1]:>4s} {rows[-1][2]:8s} "
                      f"numba {tk*1e6:10.1f} us  numpy {tr*1e6:10.1f} us  x{tr/tk:6.2f}  "
                      f"{gbs:6.1f} GB/s ({rows[-1][7]:5.1f}%)  best {gbs_best:6.1f} GB/s "
                      f"({rows[-1][9]:5.1f}%)", flush=True)


@numba.njit(cache=True)
def _numba_copy(src, dst):
    """Control: a plain Numba loop with 1 read + 1 write stream and ordinary stores.

    (A bare ``dst[p] = src[p]`` is turned into a memcpy call by LLVM, so it
    would not be a control; multiplying by 1.5 keeps it a vectorised loop.)
    """
    for p in range(src.shape[0]):
        dst[p] = 1.5 * src[p]


def bench_interleaved(n, rounds):
    """Best-of-``rounds`` GB/s of the float64 kernels and of np.copyto at the SAME size n,
    timed in interleaved rounds (kernel, copy, kernel, copy, ...), so that load from other
    processes hits both alike.  Returns markdown table lines."""
    rng = np.random.default_rng(3)
    w, g, pi, v = (rng.standard_normal(n) for _ in range(4))
    o1, o2, dst = (np.empty(n) for _ in range(3))
    recv = rng.standard_normal((2, n))
    cw = np.array([0.3, 0.3])
    item = 8
    calls = {
        "np.copyto (reference)": (lambda: np.copyto(dst, v), 2),
        "numba loop dst = 1.5 src (control)": (lambda: _numba_copy(v, o1), 2),
        "soft_threshold": (lambda: K.soft_threshold(v, 0.5, out=o1), 2),
        "linearized_step l1 (w~, z)":
            (lambda: K.linearized_step(w, g, pi, 2.0, 0.5, "l1", 0.1, out_wt=o1, out_z=o2), 5),
        "linearized_step l1 (z only, over w)":
            (lambda: K.linearized_step(w, g, pi, 2.0, 0.0, "l1", 0.1, out_wt=w, out_z=w), 4),
        "relax": (lambda: K.relax(w, g, 0.5, out=o1), 3),
        "combine (2 neighbours)": (lambda: K.combine(v, recv, 0.4, cw, out=o1), 4),
    }
    best = {k: float("inf") for k in calls}
    for fn, _ in calls.values():
        fn()
    for _ in range(rounds):
        for k, (fn, _) in calls.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    copy = 2 * n * item / best["np.copyto (reference)"] / 1e9
    lines = [f"| kernel (float64, n={n:.3g}) | streams | best us | GB/s | % of copy |",
             "|---|---:|---:|---:|---:|"]
    for k, (_, streams) in calls.items():
        gbs = streams * n * item / best[k] / 1e9
        lines.append(f"| {k} | {streams} | {best[k] * 1e6:.0f} | {gbs:.1f} | {100 * gbs / copy:.0f} |")
        print(lines[-1], flush=True)
    return lines


def bench_threads(repeats, quick, rows):
    """Block-parallel kernels with 1 vs 2 threads (same blocks, same work)."""
    top = numba.config.NUMBA_NUM_THREADS
    rng = np.random.default_rng(2)
    n = 4_000_000 if not quick else 100_000
    w, g, pi = (rng.standard_normal(n) for _ in range(3))
    o1, o2 = np.empty(n), np.empty(n)
    m, d = (512, 4000) if not quick else (64, 200)
    J = rng.standard_normal((m, d)) / np.sqrt(m)
    r = rng.standard_normal(m)
    wd, pid, outd = rng.standard_normal(d), 0.01 * rng.standard_normal(d), np.empty(d)
    X = rng.standard_normal((n // 100, 100))
    y = rng.standard_normal(n // 100)
    gl = np.empty(100)
    tests = [
        (f"linearized_step_blocks l1, n={n:.0e}, C=2",
         lambda: K.linearized_step_blocks(w, g, pi, 2.0, 0.5, "l1", 0.1, 2, out_wt=o1, out_z=o2)),
        (f"gn_solve_blocks l2 (CG), J {m}x{d}, C=2, 20 it/block",
         lambda: K.gn_solve_blocks(wd, J, r, pid, 0.1, "l2", 0.01, m, 2, max_iter=20, tol=0.0,
                                   out=outd)),
        (f"gn_solve_blocks l1 (FISTA), J {m}x{d}, C=2, 20 it/block",
         lambda: K.gn_solve_blocks(wd, J, r, pid, 0.1, "l1", 0.01, m, 2, max_iter=20, tol=0.0,
                                   out=outd)),
        (f"least_squares_blocks, X {n // 100}x100, C=2",
         lambda: K.least_squares_blocks(w[:100], X, y, 2, out=gl)),
    ]
    try:
        for name, fn in tests:
            t = []
            for threads in (1, 2):
                K.set_threads(threads)
                t.append(timeit(fn, repeats)[0])
            rows.append((name, t[0] * 1e3, t[1] * 1e3, t[0] / t[1]))
            print(f"{name:60s} 1 thr {t[0]*1e3:9.2f} ms  2 thr {t[1]*1e3:9.2f} ms  "
                  f"speed-up {t[0]/t[1]:5.2f}", flush=True)
    finally:
        K.set_threads(top)


def machine():
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": f"{numba.__version__}, NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}, "
                 f"threading layer {numba.threading_layer()}",
        "flags": f"FASTMATH={_flags.FASTMATH}, CACHE={_flags.CACHE}, PARALLEL={_flags.PARALLEL}",
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="markdown file to write")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    sizes = [10**4] if args.quick else [10**5, 10**6, 4 * 10**6]
    repeats = args.repeats or (3 if args.quick else 15)
    load0 = os.getloadavg()
    K.set_threads(1)          # memory-bound kernels are serial; measure them on one core
    copy_bw = copy_bandwidth(repeats)
    print(f"copy bandwidth (np.copyto, 256 MiB, read+write): median {copy_bw[0]:.1f} GB/s, "
          f"best {copy_bw[1]:.1f} GB/s", flush=True)
    mem_rows, thr_rows = [], []
    bench_memory(sizes, repeats, copy_bw, mem_rows)
    copy_bw2 = copy_bandwidth(repeats)
    inter = bench_interleaved(10**5 if args.quick else 16 * 10**6, 5 if args.quick else 40)
    bench_threads(repeats, args.quick, thr_rows)
    load1 = os.getloadavg()
    info = machine()
    cmd = "python benchmarks/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Kernel benchmark (issue 5)", "",
             f"Command: `{cmd.strip()}` (from the repository root).", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- copy bandwidth (np.copyto, 256 MiB float64, read + write bytes): "
              f"median {copy_bw[0]:.1f} GB/s (best repeat {copy_bw[1]:.1f}) before the kernel "
              f"runs; median {copy_bw2[0]:.1f} (best {copy_bw2[1]:.1f}) after",
              f"- load average (1, 5, 15 min) at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
              f"at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (shared machine)",
              "", "## Memory-bound kernels (1 thread)", "",
              "Median time per call of the public kernel (validation included, `out=` given) and "
              "of its NumPy twin. GB/s = compulsory bytes (inputs read once, outputs written once) "
              "/ median time; % is of the median copy bandwidth measured first. The last two "
              "columns use the best repeat of each (kernel and copy): on a shared machine they "
              "are the better estimate of what the kernel can do.", "",
              "| kernel | n | dtype | numba us | numpy us | numpy/numba | GB/s | % copy BW "
              "| best GB/s | best % |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, n, dt, tk, tr, ratio, gbs, pct, gbs_b, pct_b in mem_rows:
        lines.append(f"| {name} | {n} | {dt} | {tk:.1f} | {tr:.1f} | {ratio:.2f} | {gbs:.1f} | "
                     f"{pct:.0f} | {gbs_b:.1f} | {pct_b:.0f} |")
    lines += ["", "## Same size as the copy, interleaved (1 thread)", "",
              "Each round times every call once, in turn; best round per call. n = 16e6 float64 "
              "(128 MiB per array, far beyond the caches).", ""] + inter
    lines += ["", "## Block-parallel kernels, 1 vs 2 threads (float64)", "",
              "| kernel | 1 thread ms | 2 threads ms | speed-up |", "|---|---:|---:|---:|"]
    for name, t1, t2, sp in thr_rows:
        lines.append(f"| {name} | {t1:.2f} | {t2:.2f} | {sp:.2f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
