"""Issue 29: does CDMSGD's mix overlap backward?  Step time with compute alone, mix alone, and
compute + mix under each ``[comm] progress`` mode, side by side in one MPI job.

    mpiexec -n 2 python benchmarks/bench_overlap.py [--model mlp] [--hidden 256,128] [--batch 128]
        [--windows 7] [--steps 20] [--topology ring] [--progress none,hooks,thread]
        [--json benchmarks/results/overlap_n2.json]

Per rank: the driver's CDMSGD step (Nesterov, mu 0.9, ``TorchOracle`` on a Fashion-MNIST IID
shard, batch ``--batch``), with one flat model, oracle and ``GraphComm`` per method so that every
method keeps its own state (all start from the same weights):

* ``compute``: ``CDMSGD.step`` with the mix replaced by a local copy (no MPI call at all): the
  forward, backward and update;
* ``mix``: ``GraphComm.start_mix(x).wait()`` of the same flat vector, nothing else;
* ``step(P)``: ``CDMSGD.step`` on a ``GraphComm`` with ``[comm] progress = P``: the mix is
  started before the gradient and waited for after it.  ``thread:US`` sets the thread's poll
  interval to US microseconds (0: the thread waits in ``MPI_Wait``).

Timing: ``--windows`` windows of ``--steps`` steps; within a window the methods run one after the
other (order rotated every window), each after a barrier, timed as the slowest rank's time.
Reported: the median ms per step, ``step(P) / max(compute, mix)`` (1.0 = perfect overlap) and
``step(P) / (compute + mix)`` (1.0 = no overlap at all), the ``MPI_Test`` calls per step made by
the hooks or the thread, the MPI thread level, and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


class _LocalMix:
    """A comm whose mix is a local copy: CDMSGD's step without communication."""

    class _Done:
        def __init__(self, out):
            self.out = out

        def wait(self):
            return self.out

    def start_mix(self, x, out=None):
        out[...] = x
        return self._Done(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--hidden", default="256,128")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--topology", default="ring")
    p.add_argument("--progress", default="none,hooks,thread")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    import numpy as np
    import torch

    from mpidl import config as C
    from mpidl.algorithms.cdsgd import CDMSGD, CDMSGDConfig
    from mpidl.comm import GraphComm
    from mpidl.data import load_agent_data
    from mpidl.flat import FlatModel
    from mpidl.layouts import build_topology
    from mpidl.models import build_model
    from mpidl.oracles import TorchOracle

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    topo, _ = build_topology(C.TopologyConfig(name=args.topology), size)
    mc = GraphComm(world, topo)
    shard = load_agent_data(args.dataset, None, "iid", 0.5, 0, rank=rank, world_size=size, comm=mc)
    spe = int(mc.allreduce(len(shard.y) // args.batch, op="min"))
    cfg = CDMSGDConfig(lr=0.01, momentum=0.9)

    def member(comm_progress):
        fm = FlatModel(build_model(args.model, shard.input_shape, shard.num_classes, hidden, seed=0))
        oracle = TorchOracle(fm, shard.x, shard.y, batch_size=args.batch, steps_per_epoch=spe, seed=0, rank=rank,
                             num_classes=shard.num_classes)
        gc = None
        if comm_progress is not None:
            mode, _, poll = comm_progress.partition(":")
            gc = GraphComm(world, topo, progress=mode)
            if poll:                    # thread:POLL_US (0 = the thread waits in MPI_Wait)
                gc.overlap.poll_s = float(poll) * 1e-6
            gc.attach(fm)
        algo = CDMSGD(cfg, steps_per_epoch=spe, num_samples=len(shard.y))
        return {"fm": fm, "oracle": oracle, "gc": gc, "algo": algo, "state": algo.init(fm.x, gc), "k": 0}

    def stepper(m, comm):
        def run(n):
            state, k = m["state"], m["k"]
            for _ in range(n):
                state, _ = m["algo"].step(k, state, m["oracle"], comm)
                k += 1
            m["state"], m["k"] = state, k
        return run

    modes = [p for p in args.progress.split(",") if p]
    local = member(None)
    mixm = member("none")
    buf = np.empty_like(mixm["fm"].x)

    def run_mix(n):
        gc, x = mixm["gc"], mixm["fm"].x
        for _ in range(n):
            gc.start_mix(x, out=buf).wait()

    methods = {"compute": stepper(local, _LocalMix()), "mix": run_mix}
    members = {}
    for mode in modes:
        members[mode] = member(mode)
        methods[f"step({mode})"] = stepper(members[mode], members[mode]["gc"])

    def timed(fn, n):
        world.Barrier()
        t0 = time.perf_counter()
        fn(n)
        return world.allreduce(time.perf_counter() - t0, op=MPI.MAX)

    for fn in methods.values():
        fn(args.warmup)
    tests0 = {m: members[m]["gc"].overlap.tests for m in modes}
    ms = {m: [] for m in methods}
    names = list(methods)
    for w in range(args.windows):
        order = names[w % len(names):] + names[:w % len(names)]
        for m in order:
            ms[m].append(1e3 * timed(methods[m], args.steps) / args.steps)
    med = {m: statistics.median(v) for m, v in ms.items()}
    n_steps = args.windows * args.steps
    tests = {m: (members[m]["gc"].overlap.tests - tests0[m]) / n_steps for m in modes}
    compute, mix = med["compute"], med["mix"]
    ratios = {m: {"over_max": med[f"step({m})"] / max(compute, mix),
                  "over_sum": med[f"step({m})"] / (compute + mix)} for m in modes}
    load1 = os.getloadavg()
    level = MPI.Query_thread()
    same = {}
    for m in modes:              # the modes change no bit: every member took the same steps
        a = members[m]["fm"].x
        same[m] = bool(world.allreduce(bool(np.array_equal(a, members[modes[0]]["fm"].x)), op=MPI.LAND))
    if rank == 0:
        print(f"CDMSGD {args.model} {hidden} ({local['fm'].dim} params, {4 * local['fm'].dim / 1e6:.2f} MB), "
              f"batch {args.batch}, {size} ranks on {args.topology}, {args.windows} windows x {args.steps} steps; "
              f"MPI thread level {level} (multiple = {MPI.THREAD_MULTIPLE})")
        print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
              f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
        print(f"median ms/step: compute {compute:.2f}, mix {mix:.2f}, compute + mix {compute + mix:.2f}")
        for m in modes:
            print(f"  step({m}) {med[f'step({m})']:.2f} ms: / max(compute, mix) = {ratios[m]['over_max']:.3f}, "
                  f"/ (compute + mix) = {ratios[m]['over_sum']:.3f}, MPI_Test calls/step {tests[m]:.1f}, "
                  f"same bits as step({modes[0]}): {same[m]}")
        if args.json:
            meta = {"world_size": size, "model": args.model, "hidden": hidden, "params": local["fm"].dim,
                    "batch": args.batch, "topology": args.topology, "threads": args.threads,
                    "mpi": MPI.Get_library_version().splitlines()[0], "thread_level": level,
                    "torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
                    "load_avg_before": load0, "load_avg_after": load1, "command": " ".join(sys.argv),
                    "ms_per_step": ms, "median_ms": med, "ratios": ratios, "tests_per_step": tests,
                    "same_bits": same}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(meta, indent=1))
    for m in [mixm] + list(members.values()):
        m["gc"].close()
    mc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
