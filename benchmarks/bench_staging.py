"""Issue 23: what the tensor paths of a mix cost on the host, next to the NumPy path (CPU only).

    mpiexec -n 2 python benchmarks/bench_staging.py [--sizes 100000,1000000,10000000] [--reps 15]

One ``GraphComm.mix(x, out=x)`` of a float32 vector of P elements on a complete graph, four ways:

* ``numpy``: a NumPy array (zero copy; the Numba combine): the CPU path;
* ``staged, 1 chunk``: a torch tensor through the plan's own host buffer (what a GPU run does
  without a CUDA-aware MPI), in one chunk: a copy in, the collective, the combine, a copy out;
* ``staged, 8 MiB chunks``: the same cut into 8 MiB chunks (the default), one collective each;
* ``direct``: the tensor handed to MPI as it is and the combine done in torch (the CUDA-aware
  path, here on CPU tensors).

On the CPU the copies are memory copies, not PCIe transfers, so this measures the software
overhead of the staging and chunking (extra copies, more collectives) and of the torch combine,
not what a GPU would see.  Median of ``--reps`` timed mixes after 3 untimed ones, a barrier
before each; rank 0 prints one Markdown row per (P, way) with the ratio to ``numpy``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    import torch
    from mpi4py import MPI

    from mpidl import topology as T
    from mpidl.comm import GraphComm, core
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    n, rank = world.Get_size(), world.Get_rank()
    if rank == 0:
        print(f"mix of float32 vectors, complete graph, {n} ranks, median of {args.reps}")
        print("| P | way | median ms | vs numpy |")
        print("|---|---|---|---|")
    for size in (int(float(s)) for s in args.sizes.split(",")):
        x0 = np.random.default_rng(rank).standard_normal(size).astype(np.float32)
        ways = [("numpy", {}, False), ("staged, 1 chunk", {"stage_chunk": 1 << 62}, True),
                ("staged, 8 MiB chunks", {}, True), ("direct", {"cuda_aware": True}, False)]
        base = None
        for name, kw, staged in ways:
            core.STAGE_CPU_TENSORS = staged
            with GraphComm(world, T.complete(n), **kw) as gc:
                x = x0.copy() if name == "numpy" else torch.from_numpy(x0.copy())
                times = []
                for r in range(3 + args.reps):
                    world.Barrier()
                    t0 = time.perf_counter()
                    gc.mix(x, out=x)
                    dt = time.perf_counter() - t0
                    if r >= 3:
                        times.append(world.allreduce(dt, op=MPI.MAX))
            core.STAGE_CPU_TENSORS = False
            med = float(np.median(times)) * 1e3
            base = base if base is not None else med
            if rank == 0:
                print(f"| {size:,} | {name} | {med:.2f} | {med / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
