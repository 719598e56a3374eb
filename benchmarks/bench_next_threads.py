"""NEXT iteration with 1 vs 2 threads per agent (issue 5, "parallel inside each agent").

    python benchmarks/bench_next_threads.py [--repeats 20] [--json out.json]

One agent (no MPI: a 1-rank GraphComm over COMM_SELF) holding all of digits, MLP [32]
(P = 2410), squared loss.  It times the pieces of one NEXT step at
threads_per_agent = 1 and 2 with the SAME blocks (C = 2), so both thread counts do
identical arithmetic:

* Gauss-Newton surrogate solve (kernels.gn_solve_blocks, CG, 20 iterations per block, tol 0)
  on the real Jacobian of the batch (m = n_samples x 10 rows);
* the linearised surrogate step (kernels.linearized_step_blocks) at P = 2410 and at
  P = 4e6 (a vector the size of a large model: there the pass is memory-bound);
* a whole NEXT step with the Gauss-Newton surrogate (Jacobian by torch.func.jacrev +
  solve + mix + gradient), torch kept at 1 thread, so only the surrogate solve changes.

Kernel-level 1-vs-2-thread numbers for synthetic shapes are in docs/bench_kernels.md
(benchmarks/bench_kernels.py); this script measures them inside the algorithm.
"""
import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def timeit(fn, repeats, min_time=0.02):
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_time / once))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--samples", type=int, default=600, help="digits samples held by the agent")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import numba
    import torch
    from mpi4py import MPI

    from mpidl import kernels as K
    from mpidl import topology as T
    from mpidl.algorithms.next import NEXT, NEXTConfig
    from mpidl.comm import GraphComm
    from mpidl.data import load_agent_data
    from mpidl.flat import FlatModel
    from mpidl.models import build_model
    from mpidl.oracles import TorchOracle

    torch.set_num_threads(1)
    sh = load_agent_data("digits", None, "iid", 0.5, 0, rank=0, world_size=1)
    x, y = sh.x[:args.samples], sh.y[:args.samples]
    fm = FlatModel(build_model("mlp", sh.input_shape, sh.num_classes, (32,), seed=0), torch.float64)
    orc = TorchOracle(fm, x, y, batch_size=len(y), steps_per_epoch=1, num_classes=10, loss="squared")
    w = fm.x.copy()
    J, r, m = orc.residual_jacobian(w, 0)
    _, g = orc.loss_grad(w, 0)
    g = g.copy()
    pi = np.random.default_rng(0).standard_normal(w.shape) * 1e-3
    out = np.empty_like(w)
    big = 4_000_000
    rng = np.random.default_rng(1)
    wb, gb, pb = (rng.standard_normal(big) for _ in range(3))
    ob = np.empty(big)
    rows = []
    gc = GraphComm(MPI.COMM_SELF, T.ring(1))
    for threads in (1, 2):
        K.set_threads(threads)
        t_gn = timeit(lambda: K.gn_solve_blocks(w, J, r, pi, 1.0, "l2", 1e-3, m, 2, max_iter=20, tol=0.0,
                                                out=out), args.repeats)
        t_lin_s = timeit(lambda: K.linearized_step_blocks(w, g, pi, 4.0, 0.5, "l2", 1e-3, 2,
                                                          out_wt=out, out_z=out), args.repeats)
        t_lin_b = timeit(lambda: K.linearized_step_blocks(wb, gb, pb, 4.0, 0.5, "l2", 1e-3, 2,
                                                          out_wt=ob, out_z=ob), args.repeats)
        algo = NEXT(NEXTConfig(tau=1.0, alpha0=0.5, eps=0.0, reg="l2", lam=1e-3, surrogate="gauss-newton",
                               inner_iters=20, inner_tol=0.0, threads_per_agent=threads, blocks=2))
        st = algo.init(w.copy(), gc)
        st, _ = algo.step(0, st, orc, gc)
        k = [1]

        def step():
            nonlocal st
            st, _ = algo.step(k[0], st, orc, gc)
            k[0] += 1
        t_step = timeit(step, max(3, args.repeats // 3), min_time=0.0)
        t_jac = timeit(lambda: orc.residual_jacobian(w, 0), max(3, args.repeats // 3), min_time=0.0)
        rows.append({"threads": threads, "gn_solve_ms": 1e3 * t_gn, "lin_small_us": 1e6 * t_lin_s,
                     "lin_4e6_ms": 1e3 * t_lin_b, "next_gn_step_ms": 1e3 * t_step, "jacobian_ms": 1e3 * t_jac})
        print(rows[-1], flush=True)
    gc.close()
    meta = {"J": list(J.shape), "P": int(w.shape[0]), "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "numba_threads_max": int(numba.config.NUMBA_NUM_THREADS),
            "threading_layer": numba.threading_layer(), "loadavg_1min": os.getloadavg()[0]}
    a, b = rows
    lines = [f"One agent, digits MLP [32] (P = {meta['P']}), squared loss, J {J.shape[0]} x {J.shape[1]} "
             f"float64, C = 2 blocks for both thread counts, torch 1 thread; Numba threading layer "
             f"{meta['threading_layer']}; {meta['cores']} cores, 1-min load average {meta['loadavg_1min']:.1f} "
             "during the run (shared machine). Median of repeats.", "",
             "| piece | 1 thread | 2 threads | speed-up |", "|---|---:|---:|---:|"]
    for key, name, unit in (("gn_solve_ms", "Gauss-Newton solve (CG, 20 it/block)", "ms"),
                            ("lin_small_us", f"linearised step, P = {meta['P']}", "us"),
                            ("lin_4e6_ms", "linearised step, P = 4e6", "ms"),
                            ("jacobian_ms", "Jacobian (torch.func.jacrev, unchanged)", "ms"),
                            ("next_gn_step_ms", "whole NEXT step, Gauss-Newton", "ms")):
        lines.append(f"| {name} | {a[key]:.3g} {unit} | {b[key]:.3g} {unit} | {a[key] / b[key]:.2f} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
