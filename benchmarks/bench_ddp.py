"""Issues 4 and 29 throughput: mpidl CDSGD and centralized steps/s vs torch DistributedDataParallel
(gloo), side by side.

    mpiexec -n 2 python benchmarks/bench_ddp.py [--models mlp,cnn] [--windows 7] [--steps 40]
                                                [--buckets 0,1] [--progress none]
                                                [--methods cdsgd,central,ddp]
                                                [--json benchmarks/results/ddp_n2.json] [--doc]

One MPI job runs both.  Rank and world size come from MPI; torch.distributed is
initialised with the gloo backend at MASTER_ADDR=127.0.0.1 and a free port that
rank 0 picks and broadcasts over MPI.  Per model (same seed, same weights at
start, batch 128, the same IID Fashion-MNIST shard on each rank and the same
batch indices as ``TorchOracle.indices``):

* ``cdsgd``: the driver's inner loop without evaluation: ``CDSGD.step`` with
  the ``TorchOracle`` on the flat parameter buffer and a ``GraphComm`` on
  ring(N), plus the driver's per-step bookkeeping (finite-loss check, the
  training-accuracy window) -- exactly what ``mpidl.driver`` does per step
  except the preemption check;
* ``cdsgd+guard``: the same plus the driver's per-step preemption check
  (``PreemptionGuard.should_stop``: a nonblocking scalar reduction started at
  step k and completed at step k + 1);
* ``cdsgd+allreduce``: the same plus the check as it was before issue 10, one
  blocking scalar allreduce per step;
* ``central(B)``: the driver's inner loop of ``centralized`` (momentum 0, the same lr as DDP's
  SGD): ``Centralized.step`` with the ``TorchOracle`` and a ``GraphComm`` attached to the
  model with ``[comm] bucket_mb = B`` (``--buckets``, one method per size; 0 = one blocking
  allreduce after backward) and ``[comm] progress`` = ``--progress``;
* ``ddp``: ``DistributedDataParallel(model)`` forward, cross-entropy,
  ``zero_grad``, backward (gradient allreduce in the hooks), ``SGD.step``,
  ``loss.item()``.

Timing: ``--windows`` windows of ``--steps`` steps each; within a window the
methods run one after the other (order rotated every window), each started
after a barrier and timed as the slowest rank's time.  Reported: median
steps/s over windows, the ratio cdsgd / ddp and every central(B) / ddp.
``--methods`` picks families (``cdsgd`` = the three cdsgd rows, ``central``, ``ddp``).
The load average before and after is printed and stored in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--steps", type=int, default=40, help="steps per window (CNN: a quarter, at least 5)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="")
    p.add_argument("--profile", action="store_true", help="also time the parts of one CDSGD step")
    p.add_argument("--buckets", default="0,1", help="central(B) rows: [comm] bucket_mb values (0 = one allreduce)")
    p.add_argument("--progress", default="none", help="[comm] progress of the central rows; thread:US sets the thread's poll interval "
                   "(0: it waits in MPI_Wait)")
    p.add_argument("--methods", default="cdsgd,central,ddp", help="families to time: cdsgd, central, ddp")
    args = p.parse_args(argv)

    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(args.threads)
    # gloo's rendezvous: rank 0's loopback on one node; on several nodes (an emulated cluster,
    # scripts/cluster/vnodes.sh) the address rank 0's hostname resolves to
    hosts = world.allgather(socket.gethostname())
    addr, port = "127.0.0.1", None
    if rank == 0:
        if len(set(hosts)) > 1:
            addr = socket.gethostbyname(hosts[0])
        with socket.socket() as s:
            s.bind((addr, 0))
            port = s.getsockname()[1]
    addr, port = world.bcast((addr, port), root=0)
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=size)

    from mpidl import topology as T
    from mpidl.algorithms.cdsgd import CDSGD, CDSGDConfig, Centralized, CentralizedConfig
    from mpidl.checkpoint import PreemptionGuard
    from mpidl.comm import GraphComm
    from mpidl.data import load_agent_data
    from mpidl.flat import FlatModel
    from mpidl.models import build_model
    from mpidl.oracles import TorchOracle

    gc = GraphComm(world, T.ring(size))
    mc = GraphComm(world, T.ring(size))
    shard = load_agent_data("fashion-mnist", None, "iid", 0.5, 0, rank=rank, world_size=size, comm=mc)
    batch = args.batch
    spe = int(mc.allreduce(len(shard.y) // batch, op="min"))
    results = {}
    families = set(args.methods.split(","))
    load0 = os.getloadavg()
    if rank == 0:
        print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; MPI thread level "
              f"{MPI.Query_thread()} (multiple = {MPI.THREAD_MULTIPLE})", flush=True)

    def timed(fn, n):
        world.Barrier()
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        return world.allreduce(dt, op=MPI.MAX)

    for model_name in args.models.split(","):
        steps = args.steps if model_name == "mlp" else max(5, args.steps // 4)
        # -- mpidl CDSGD (driver inner loop) --
        fm = FlatModel(build_model(model_name, shard.input_shape, shard.num_classes, (256, 128), seed=0))
        oracle = TorchOracle(fm, shard.x, shard.y, batch_size=batch, steps_per_epoch=spe, seed=0, rank=rank,
                             num_classes=shard.num_classes)
        algo = CDSGD(CDSGDConfig(lr=args.lr), steps_per_epoch=spe, num_samples=len(shard.y))
        st = {"state": algo.init(fm.x, gc), "k": 0}
        guard = PreemptionGuard(mc)
        guard.__enter__()

        def run_cdsgd(n, with_guard=False, blocking_check=False):
            state, k = st["state"], st["k"]
            bad, wl, wa, wn = -1, 0.0, 0.0, 0
            for _ in range(n):
                state, m = algo.step(k, state, oracle, gc)
                loss = m["loss"]
                if bad < 0 and not np.isfinite(loss):
                    bad = k
                wl += loss
                wa += oracle.last_correct
                wn += 1
                k += 1
                if with_guard:
                    guard.should_stop()
                if blocking_check:  # the check before issue 10: one blocking scalar allreduce per step
                    mc.allreduce(0, "max")
            st["state"], st["k"] = state, k

        # -- torch DDP, same model / init / data / batches --
        torch_model = build_model(model_name, shard.input_shape, shard.num_classes, (256, 128), seed=0)
        ddp = DDP(torch_model)
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
        X = torch.as_tensor(np.asarray(shard.x)).to(torch.float32)
        Y = torch.as_tensor(np.asarray(shard.y)).to(torch.long)
        dk = {"k": 0, "epoch": None, "perm": None}

        def ddp_indices(k):  # the TorchOracle's batches, drawn the same way (one permutation per epoch)
            epoch, j = divmod(k, spe)
            if epoch != dk["epoch"]:
                dk["perm"], dk["epoch"] = np.random.default_rng([0, rank, epoch]).permutation(len(Y)), epoch
            return dk["perm"][j * batch:(j + 1) * batch]

        def run_ddp(n):
            k = dk["k"]
            ddp.train()
            for _ in range(n):
                idx = torch.from_numpy(ddp_indices(k))
                out = ddp(X[idx])
                loss = torch.nn.functional.cross_entropy(out, Y[idx])
                opt.zero_grad(set_to_none=False)
                loss.backward()
                opt.step()
                float(loss.item())
                k += 1
            dk["k"] = k

        # -- mpidl centralized (driver inner loop), one method per bucket size --
        central, closers = {}, []
        for mb in ([float(b) for b in args.buckets.split(",")] if "central" in families else []):
            fmc = FlatModel(build_model(model_name, shard.input_shape, shard.num_classes, (256, 128), seed=0))
            mode, _, poll = args.progress.partition(":")
            gcc = GraphComm(world, T.ring(size), progress=mode, bucket_mb=mb)
            if poll:                    # thread:POLL_US (0 = the thread waits in MPI_Wait)
                gcc.overlap.poll_s = float(poll) * 1e-6
            gcc.attach(fmc)
            closers.append(gcc)
            orc = TorchOracle(fmc, shard.x, shard.y, batch_size=batch, steps_per_epoch=spe, seed=0, rank=rank,
                              num_classes=shard.num_classes)
            alc = Centralized(CentralizedConfig(lr=args.lr), steps_per_epoch=spe, num_samples=len(shard.y))
            stc = {"state": alc.init(fmc.x, gcc), "k": 0}

            def run_central(n, alc=alc, orc=orc, gcc=gcc, stc=stc):
                state, k = stc["state"], stc["k"]
                bad, wl, wa, wn = -1, 0.0, 0.0, 0
                for _ in range(n):
                    state, m = alc.step(k, state, orc, gcc)
                    loss = m["loss"]
                    if bad < 0 and not np.isfinite(loss):
                        bad = k
                    wl += loss
                    wa += orc.last_correct
                    wn += 1
                    k += 1
                stc["state"], stc["k"] = state, k
            central[f"central({mb:g})"] = run_central

        methods = {}
        if "cdsgd" in families:
            methods.update({"cdsgd": run_cdsgd, "cdsgd+guard": lambda n: run_cdsgd(n, True),
                            "cdsgd+allreduce": lambda n: run_cdsgd(n, blocking_check=True)})
        methods.update(central)
        if "ddp" in families:
            methods["ddp"] = run_ddp
        for fn in methods.values():
            fn(args.warmup)
        rates = {m: [] for m in methods}
        names = list(methods)
        for w in range(args.windows):
            order = names[w % len(names):] + names[:w % len(names)]
            for m in order:
                rates[m].append(steps / timed(methods[m], steps))
        guard.__exit__(None, None, None)
        for c in closers:
            c.close()
        med = {m: statistics.median(v) for m, v in rates.items()}
        res = {"params": fm.dim, "steps_per_window": steps, "windows": args.windows,
               "steps_per_s": rates, "median_steps_per_s": med, "progress": args.progress}
        if "cdsgd" in med and "ddp" in med:
            res.update({"ratio_cdsgd_over_ddp": med["cdsgd"] / med["ddp"],
                        "ratio_cdsgd_guard_over_ddp": med["cdsgd+guard"] / med["ddp"]})
        if "cdsgd" in med:
            res.update({"ratio_cdsgd_guard_over_cdsgd": med["cdsgd+guard"] / med["cdsgd"],
                        "ratio_cdsgd_allreduce_over_cdsgd": med["cdsgd+allreduce"] / med["cdsgd"]})
        if "ddp" in med:
            res.update({f"ratio_{m}_over_ddp": med[m] / med["ddp"] for m in central})
        if args.profile:
            res["profile_ms"] = _profile(algo, st, oracle, gc, ddp, opt, X, Y, ddp_indices, world, torch)
        results[model_name] = res
        if rank == 0:
            ratios = {k[len("ratio_"):].replace("_over_", "/"): v for k, v in res.items() if k.startswith("ratio_")}
            print(f"{model_name} ({fm.dim} params, batch {batch}, {size} ranks, {args.windows} windows x "
                  f"{steps} steps, progress {args.progress}): "
                  + ", ".join(f"{m} {v:.1f} steps/s" for m, v in med.items())
                  + "; " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()), flush=True)
            if args.profile:
                print("  profile (median ms per step, rank 0): " +
                      ", ".join(f"{k} {v:.3f}" for k, v in res["profile_ms"].items()), flush=True)
        del ddp, opt
    if rank == 0 and args.json:
        meta = {"world_size": size, "batch": batch, "threads": args.threads, "machine": platform.machine(),
                "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                "mpi": MPI.Get_library_version().splitlines()[0],
                "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MPIR_CVAR_ENABLE_HEAVY_YIELD")},
                "load_avg_before": load0, "load_avg": os.getloadavg(), "command": " ".join(sys.argv),
                "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(meta, indent=1))
    if rank == 0:
        load1 = os.getloadavg()
        print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}", flush=True)
    import faulthandler
    faulthandler.dump_traceback_later(60, exit=True)  # never hang at teardown
    mc.close()
    gc.close()
    dist.destroy_process_group()
    return 0


def _profile(algo, st, oracle, gc, ddp, opt, X, Y, ddp_indices, world, torch, n=30):
    """Median time of the parts of a CDSGD step and of a DDP step (rank 0's clock)."""
    import numpy as np

    fm = oracle.fm
    parts = {k: [] for k in ("indices", "forward", "backward", "mix (start+wait)", "update", "cdsgd step",
                             "ddp fwd", "ddp bwd+allreduce", "ddp opt")}
    x = st["state"].x
    buf = np.empty_like(x)
    for i in range(n):
        k = st["k"] + i
        world.Barrier()
        t0 = time.perf_counter()
        ix = oracle.indices(k)
        idx = torch.from_numpy(ix)
        t1 = time.perf_counter()
        fm.model.train()
        out = fm.model(oracle.x.take(ix, k))
        loss = torch.nn.functional.cross_entropy(out, oracle.y[idx])
        t2 = time.perf_counter()
        fm.backward(loss)
        t3 = time.perf_counter()
        gc.start_mix(x, out=buf).wait()
        t4 = time.perf_counter()
        g = fm.g
        g *= 0.0
        np.subtract(buf, g, out=buf)
        t5 = time.perf_counter()
        world.Barrier()
        t6 = time.perf_counter()
        algo.step(k, st["state"], oracle, gc)
        t7 = time.perf_counter()
        world.Barrier()
        s0 = time.perf_counter()
        idd = torch.from_numpy(ddp_indices(k))
        o2 = ddp(X[idd])
        l2 = torch.nn.functional.cross_entropy(o2, Y[idd])
        s1 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        l2.backward()
        s2 = time.perf_counter()
        opt.step()
        float(l2.item())
        s3 = time.perf_counter()
        for key, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t7 - t6, s1 - s0, s2 - s1, s3 - s2)):
            parts[key].append(1e3 * v)
    st["k"] += n
    return {k: float(np.median(v)) for k, v in parts.items()}


if __name__ == "__main__":
    sys.exit(main())
