"""Issue 23: GPU throughput of ResNet-20 on CIFAR-shaped batches (steps/s), three ways on one GPU.

    python benchmarks/bench_gpu.py [--steps 100] [--warmup 10] [--batch 128] [--json FILE]

* ``torch``: plain torch on the GPU, no communication (the floor): the model's forward,
  cross-entropy, backward and ``torch.optim.SGD.step`` on batches indexed on the host and
  copied to the device, as mpidl's oracle does;
* ``cdsgd, 1 rank``: mpidl's CDSGD step (``CDSGD.step`` with the ``TorchOracle`` on a
  ``FlatModel`` on ``cuda:0`` and a ``GraphComm``): device-resident state (the update runs
  on the GPU); at 1 rank the mix has no neighbours;
* ``cdsgd, 2 ranks, staged``: the same under ``mpiexec -n 2`` on a complete graph, both
  ranks on the same GPU (more ranks than GPUs: they time-share it), the mix staged through
  pinned host memory (one copy each way per step); per-rank steps/s and the job's samples/s;
* ``cdsgd, 2 ranks, CUDA-aware``: the device buffers handed to MPI (only when the MPI
  library reports CUDA support, :func:`mpidl.device.cuda_aware_support`; else the row says
  it was skipped).

Data: 2048 random CIFAR-shaped samples (3 x 32 x 32, 10 classes), seeded; batch 128.
Timing: after ``--warmup`` steps, ``--steps`` steps timed (device synchronised and a
barrier before and after under MPI).  Without a
CUDA device the script prints ``no CUDA device: skipped`` and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPE, CLASSES, N_SAMPLES = (3, 32, 32), 10, 2048


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N_SAMPLES,) + SHAPE).astype(np.float32),
            rng.integers(0, CLASSES, N_SAMPLES))


def floor(args) -> dict:
    """Plain torch on cuda:0, no communication."""
    import torch

    from mpidl.models import build_model
    from mpidl.oracles import batch_indices
    dev = torch.device("cuda:0")
    model = build_model("resnet20", SHAPE, CLASSES, seed=0).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    X, Y = torch.from_numpy(x), torch.from_numpy(y).long()
    spe = N_SAMPLES // args.batch
    model.train()

    def step(k):
        idx = torch.from_numpy(batch_indices(N_SAMPLES, args.batch, spe, 0, 0, k))
        xb, yb = X[idx].to(dev, non_blocking=True), Y[idx].to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return float(loss.detach())
    for k in range(args.warmup):
        step(k)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(args.warmup, args.warmup + args.steps):
        step(k)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"method": "torch, no communication", "ranks": 1, "steps_per_s": args.steps / dt,
            "samples_per_s": args.steps * args.batch / dt}


def worker(args) -> None:
    """One rank of ``mpiexec -n N bench_gpu.py --worker [--cuda-aware]``: CDSGD, device-resident."""
    import torch
    from mpi4py import MPI

    from mpidl import topology as T
    from mpidl.algorithms.cdsgd import CDSGD, CDSGDConfig
    from mpidl.comm import GraphComm
    from mpidl.flat import FlatModel
    from mpidl.models import build_model
    from mpidl.oracles import TorchOracle
    world = MPI.COMM_WORLD
    n, rank = world.Get_size(), world.Get_rank()
    torch.set_num_threads(1)
    dev = torch.device(f"cuda:{rank % torch.cuda.device_count()}")
    torch.cuda.set_device(dev)
    fm = FlatModel(build_model("resnet20", SHAPE, CLASSES, seed=0), torch.float32, device=dev)
    x, y = _data(rank)
    oracle = TorchOracle(fm, x, y, batch_size=args.batch, steps_per_epoch=N_SAMPLES // args.batch,
                         seed=0, rank=rank, num_classes=CLASSES)
    with GraphComm(world, T.ring(n) if n > 2 else T.complete(n), cuda_aware=args.cuda_aware) as gc:
        algo = CDSGD(CDSGDConfig(lr=0.05), steps_per_epoch=N_SAMPLES // args.batch)
        state = algo.init(fm.x, gc)
        for k in range(args.warmup):
            state, _ = algo.step(k, state, oracle, gc)
        torch.cuda.synchronize()
        gc.barrier()
        t0 = time.perf_counter()
        for k in range(args.warmup, args.warmup + args.steps):
            state, _ = algo.step(k, state, oracle, gc)
        torch.cuda.synchronize()
        gc.barrier()
        dt = time.perf_counter() - t0
        mb = gc.bytes_sent / 1e6
    if rank == 0:
        how = "" if n == 1 else (", CUDA-aware" if args.cuda_aware else ", staged")
        print(json.dumps({"method": f"mpidl cdsgd, {n} rank{'s' if n > 1 else ''} on one GPU{how}", "ranks": n,
                          "steps_per_s": args.steps / dt, "samples_per_s": n * args.steps * args.batch / dt,
                          "params": fm.dim, "state_on": str(state.x.device),
                          "mpi_mb_per_rank": mb}), flush=True)


def _aware():
    """The MPI library's answer to "CUDA-aware?" (in a 1-rank MPI process of its own)."""
    code = "from mpi4py import MPI; from mpidl.device import cuda_aware_support as f; print(f())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    return {"True": True, "False": False}.get(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")


def _mpiexec():
    override = os.environ.get("MPIDL_MPIEXEC", "").strip()
    if override:
        return override.split()
    cand = Path(sys.executable).parent / "mpiexec"
    return [str(cand) if cand.exists() else "mpiexec"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--json", default="")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cuda-aware", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    card = torch.cuda.get_device_name(0)
    rows = [floor(args)]
    aware = _aware()
    for n, flag in ((1, False), (2, False), (2, True)):
        if flag and not aware:
            print(f"cdsgd, 2 ranks, CUDA-aware: skipped (the MPI library reports {aware!r} for CUDA support)")
            continue
        cmd = [*_mpiexec(), "-n", str(n), sys.executable, __file__, "--worker", "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch)] + (["--cuda-aware"] if flag else [])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["samples_per_s"]
    print(f"ResNet-20, CIFAR-shaped batches of {args.batch}, {card}, torch {torch.__version__}")
    print("| method | ranks | steps/s per rank | samples/s (job) | vs torch floor |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ranks']} | {r['steps_per_s']:.1f} | {r['samples_per_s']:.0f} | "
              f"{r['samples_per_s'] / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
