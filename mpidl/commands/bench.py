"""``mpidl bench {mix,consensus}``: the graph-mixing benchmark and a consensus demo.

``mpiexec -n N python -m mpidl bench mix`` times, side by side in one run,
one consensus mix of a P-element vector done four ways on the same ranks:

* ``mix``       (a) :meth:`mpidl.comm.GraphComm.mix` ``(x, out=x)``;
* ``floor``     (b) a bare mpi4py ``Neighbor_allgather`` on the same
  distributed-graph communicator into a preallocated buffer, then a NumPy
  weighted sum with no temporaries (``np.dot(w, recv, out=t)``,
  ``x *= w_ii``, ``x += t``);
* ``gather``    the bare ``Neighbor_allgather`` alone (communication only);
* ``allreduce`` (c) ``Allreduce(IN_PLACE, x, SUM)`` then ``x *= 1/N``;
* ``gloo``      (d) ``torch.distributed.all_reduce`` (gloo, loopback) then ``/N``.

Protocol: per (topology, dtype, P) block, a few warm-up calls of every
method, then ``--repeats`` rounds; each round runs every method once in a
rotated order (interleaved), with a barrier before each timed call.  A
repeat's time is the maximum over ranks; the table shows the median over
repeats and the ratio mix / floor.

``mpiexec -n 4 python -m mpidl bench consensus`` starts every agent from a
different random vector, mixes on a ring and prints the consensus error
e_k = sqrt(1/N sum_i ||x_i - xbar||^2) per round next to the bound
(1 - gap)^k e_0 (gap = 1 - |lambda_2(W)|, tight for symmetric W).

This module imports mpi4py directly: the floor, the Allreduce and the
communicator duplication are the bare-MPI baselines GraphComm is measured
against, so they must not go through mpidl.comm.  It is a benchmark, not
library code; every library module still reaches MPI only through
:mod:`mpidl.comm`.
"""
import json
import os
import platform
import socket
import time

import numpy as np

from mpidl import topology as T
from mpidl.errors import MpidlError

HELP = "benchmarks: 'mix' (GraphComm.mix vs bare MPI, Allreduce, gloo) and 'consensus' (demo)"
NEEDS_MPI = True

METHODS = ("mix", "floor", "gather", "allreduce", "gloo")
LABELS = {"mix": "(a) GraphComm.mix", "floor": "(b) floor", "gather": "allgather only",
          "allreduce": "(c) Allreduce", "gloo": "(d) gloo"}


def _sizes(text):
    try:
        vals = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MpidlError(f"--sizes must be numbers separated by commas (1e5,1e6), got {text!r}") from None
    if not vals or min(vals) < 1:
        raise MpidlError(f"--sizes needs positive element counts, got {text!r}")
    return vals


def _names(text, allowed, what):
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise MpidlError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return vals


def add_arguments(p):
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    sub.required = True
    m = sub.add_parser("mix", help="time GraphComm.mix against bare MPI, Allreduce and gloo",
                       description="Time one graph mix four ways at this world size.")
    m.add_argument("--sizes", default="1e5,1e6,4e6", help="elements per agent (default 1e5,1e6,4e6)")
    m.add_argument("--dtypes", default="float32,float64", help="default float32,float64")
    m.add_argument("--topologies", default="ring,exponential", help="default ring,exponential")
    m.add_argument("--methods", default=",".join(METHODS),
                   help=f"subset of {','.join(METHODS)} (default all)")
    m.add_argument("--repeats", type=int, default=30, help="timed rounds per block (default 30)")
    m.add_argument("--warmup", type=int, default=3, help="untimed calls per method (default 3)")
    m.add_argument("--out", default=None, help="also write the Markdown table here (rank 0)")
    m.add_argument("--json", default=None, help="write raw per-repeat times as JSON (rank 0)")
    c = sub.add_parser("consensus", help="consensus demo: error per round vs (1 - spectral gap)^k",
                       description="Agents start from random vectors and mix; rank 0 prints the "
                                   "consensus error per round next to the predicted rate.")
    c.add_argument("--topology", default="ring", choices=sorted(T.GENERATORS))
    c.add_argument("--dim", type=int, default=1000, help="vector length per agent (default 1000)")
    c.add_argument("--rounds", type=int, default=20, help="mixing rounds (default 20)")
    c.add_argument("--seed", type=int, default=0)


def main(comm, args):
    if args.what == "consensus":
        return consensus(comm, args)
    return bench_mix(comm, args)


# -- consensus demo --------------------------------------------------------

def consensus(comm, args):
    from mpidl.comm import GraphComm

    n, rank = comm.Get_size(), comm.Get_rank()
    if args.dim < 1 or args.rounds < 0:
        raise MpidlError("--dim must be >= 1 and --rounds >= 0")
    topo = T.make(args.topology, n)
    rho = 1.0 - topo.spectral_gap()
    x = np.random.default_rng([args.seed, rank]).standard_normal(args.dim)
    with GraphComm(comm, topo) as gc:
        def error():
            xbar = gc.allreduce(x, op="mean")
            return float(np.sqrt(gc.allreduce(float(np.sum((x - xbar) ** 2)), op="mean")))

        e0 = error()
        errs = [e0]
        if rank == 0:
            print(f"consensus on {topo.summary()}")
            print(f"{n} agents, {args.dim} float64 each; predicted rate per round "
                  f"1 - gap = |lambda_2| = {rho:.6f}")
            print(f"{'round':>5} {'error':>12} {'error/e0':>12} {'(1-gap)^k':>12}")
            print(f"{0:>5} {e0:12.4e} {1.0:12.4e} {1.0:12.4e}")
        t0 = time.perf_counter()
        gc.reset_counters()
        for k in range(1, args.rounds + 1):
            gc.mix(x, out=x)
            e = error()
            errs.append(e)
            if rank == 0:
                rel = e / e0 if e0 > 0 else 0.0
                print(f"{k:>5} {e:12.4e} {rel:12.4e} {rho ** k:12.4e}")
        dt = time.perf_counter() - t0
        sent = gc.bytes_sent
    K = args.rounds
    if rank == 0:
        ek = errs[-1]
        if e0 > 0 and ek > 0 and K > 0:
            obs = f"{(ek / e0) ** (1.0 / K):.6f}"
        else:
            obs = "0 (exact consensus)" if K > 0 else "n/a"
        print(f"final: error {e0:.4e} -> {ek:.4e} in {K} rounds; observed rate per round {obs}, "
              f"predicted {rho:.6f}; {dt:.3f} s, {sent} bytes sent by rank 0")
    return 0


# -- mix benchmark ---------------------------------------------------------

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_gloo(comm):
    """Collective. A gloo process group on loopback, rank and size taken from MPI."""
    import torch.distributed as dist
    if dist.is_initialized():
        return dist
    port = comm.bcast(_free_port() if comm.Get_rank() == 0 else None, root=0)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=comm.Get_rank(), world_size=comm.Get_size())
    return dist


def machine_facts(comm):
    """Collective. Facts about the run for the results header (same on every rank)."""
    from mpi4py import MPI
    import mpi4py
    import numba
    import sys
    torch = sys.modules.get("torch")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    hosts = sorted(set(comm.allgather(MPI.Get_processor_name())))
    lib = MPI.Get_library_version().strip().splitlines()[0].strip()
    return {"ranks": comm.Get_size(), "hosts": len(hosts), "cores": cores,
            "cpu": _cpu_model(), "mpi": " ".join(lib.split()), "mpi4py": mpi4py.__version__,
            "numpy": np.__version__, "numba": numba.__version__, "torch": torch.__version__ if torch else "not loaded",
            "python": platform.python_version(),
            "oversubscribed": comm.Get_size() > cores * len(hosts),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "mpi_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MPIR_CVAR_")}}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _Block:
    """Buffers and callables of every method for one (topology, dtype, P)."""

    def __init__(self, gc, world, dist, P, dtype, methods):
        from mpi4py import MPI
        rank, n = gc.rank, gc.size
        rng = np.random.default_rng([7, rank])
        init = rng.standard_normal(P).astype(dtype)
        graph, deg = gc.graph, len(gc.in_neighbors)
        w = np.ascontiguousarray(gc.topology.in_weights(rank), dtype=dtype)
        w_self = dtype(gc.topology.self_weight(rank))
        inv_n = dtype(1.0 / n)
        self.calls = {}
        bufs = {m: init.copy() for m in methods}
        self.bufs = bufs
        if "mix" in methods:
            xa = bufs["mix"]
            self.calls["mix"] = lambda: gc.mix(xa, out=xa)
        if "floor" in methods or "gather" in methods:
            recv = np.empty((deg, P), dtype=dtype)
            tmp = np.empty(P, dtype=dtype)
            if "floor" in methods:
                xb = bufs["floor"]

                def floor():
                    graph.Neighbor_allgather(xb, recv)
                    np.multiply(xb, w_self, out=xb)
                    if deg:
                        np.dot(w, recv, out=tmp)
                        np.add(xb, tmp, out=xb)
                self.calls["floor"] = floor
            if "gather" in methods:
                xg = bufs["gather"]
                self.calls["gather"] = lambda: graph.Neighbor_allgather(xg, recv)
        if "allreduce" in methods:
            xc = bufs["allreduce"]

            def allreduce():
                world.Allreduce(MPI.IN_PLACE, xc, op=MPI.SUM)
                np.multiply(xc, inv_n, out=xc)
            self.calls["allreduce"] = allreduce
        if "gloo" in methods:
            import torch
            td = torch.from_numpy(bufs["gloo"])

            def gloo():
                dist.all_reduce(td)
                td.mul_(float(inv_n))
            self.calls["gloo"] = gloo


def _median(a):
    return float(np.median(a))


def bench_mix(comm, args):
    from mpi4py import MPI
    from mpidl.comm import GraphComm

    sizes = _sizes(args.sizes)
    dtypes = _names(args.dtypes, ("float32", "float64"), "dtype")
    topos = _names(args.topologies, sorted(T.GENERATORS), "topology")
    methods = _names(args.methods, METHODS, "method")
    methods = [m for m in METHODS if m in methods]
    if args.repeats < 1 or args.warmup < 0:
        raise MpidlError("--repeats must be >= 1 and --warmup >= 0")
    if "gloo" in methods:
        import torch
        torch.set_num_threads(1)
    n, rank = comm.Get_size(), comm.Get_rank()
    world = comm.Dup()  # the Allreduce baseline's own communicator
    dist = _init_gloo(comm) if "gloo" in methods else None
    facts = machine_facts(comm)
    rows = []
    try:
        for tname in topos:
            topo = T.make(tname, n)
            with GraphComm(comm, topo) as gc:
                for dname in dtypes:
                    dtype = np.dtype(dname).type
                    for P in sizes:
                        rows.append(_time_block(gc, world, dist, P, dtype, methods, args))
                        rows[-1].update(N=n, topology=tname, degree_max=max(
                            len(topo.in_neighbors(i)) for i in range(n)), dtype=dname, P=P)
    finally:
        world.Free()
        if dist is not None:
            dist.destroy_process_group()
    if hasattr(os, "getloadavg"):
        facts["load_avg_1min_end"] = os.getloadavg()[0]
    if rank == 0:
        table = format_table(rows, methods)
        print(format_header(facts, args))
        print(table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(format_header(facts, args) + "\n\n" + table + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"facts": facts, "methods": methods, "repeats": args.repeats,
                           "rows": rows}, f, indent=1)
    return 0


def _time_block(gc, world, dist, P, dtype, methods, args):
    from mpi4py import MPI
    blk = _Block(gc, world, dist, P, dtype, methods)
    for m in methods:
        for _ in range(args.warmup):
            blk.calls[m]()
    R = args.repeats
    times = np.zeros((len(methods), R))
    barrier = world.Barrier
    clock = time.perf_counter
    for r in range(R):
        for q in range(len(methods)):
            i = (q + r) % len(methods)  # rotate the order: no method always runs first
            call = blk.calls[methods[i]]
            barrier()
            t0 = clock()
            call()
            times[i, r] = clock() - t0
    tmax = np.empty_like(times)
    world.Allreduce(times, tmax, op=MPI.MAX)
    med = {m: _median(tmax[i]) for i, m in enumerate(methods)}
    row = {"median_s": med, "times_s": {m: tmax[i].tolist() for i, m in enumerate(methods)}}
    if "mix" in methods and "floor" in methods:
        # both buffers started equal and took warmup + repeats mixes: they must agree
        a, b = blk.bufs["mix"], blk.bufs["floor"]
        err = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300)) if a.size else 0.0
        row["mix_vs_floor_relerr"] = world.allreduce(err, op=MPI.MAX)
    return row


def format_header(facts, args=None):
    f = facts
    over = "yes" if f["oversubscribed"] else "no"
    return (f"{f['ranks']} ranks on {f['hosts']} host(s) with {f['cores']} usable core(s) "
            f"({f['cpu']}); oversubscribed: {over}; OMP_NUM_THREADS={f['omp_num_threads']}"
            + "".join(f"; {k}={v}" for k, v in f.get("mpi_env", {}).items())
            + (f"; 1-min load average {f['load_avg_1min']:.1f} at start" if f.get("load_avg_1min") is not None else "")
            + (f", {f['load_avg_1min_end']:.1f} at end" if f.get("load_avg_1min_end") is not None else "")
            + "\n"
            f"{f['mpi']}; mpi4py {f['mpi4py']}, numpy {f['numpy']}, numba {f['numba']}, "
            f"torch {f['torch']}, Python {f['python']}"
            + (f"\nmedian of {args.repeats} interleaved repeats, each the max over ranks; times in ms"
               if args is not None else ""))


def fmt_count(p):
    """1e5, 4e6, 1000 -> '1e5', '4e6', '1e3' (exact round numbers only; else the integer)."""
    if p < 1000:
        return str(p)
    m, e = f"{p:.0e}".split("e")
    return f"{m}e{int(e)}" if int(m) * 10 ** int(e) == p else str(p)


def format_table(rows, methods):
    """Markdown table: one row per (N, topology, dtype, P), medians in ms, a/b ratios.

    ``a/b`` is the ratio of the medians (the headline number); ``a/b of minima``
    the ratio of the fastest repeats, which load from other processes inflates least.
    """
    cols = [LABELS[m] + " ms" for m in methods]
    ratio = "mix" in methods and "floor" in methods
    head = ["N", "topology", "dtype", "P", "MB"] + cols + (["a/b", "a/b of minima"] if ratio else [])
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        med = r["median_s"]
        mb = r["P"] * np.dtype(r["dtype"]).itemsize / 1e6
        cells = [str(r["N"]), r["topology"], r["dtype"], fmt_count(r["P"]),
                 f"{mb:g}"]
        cells += [f"{1e3 * med[m]:.3f}" for m in methods]
        if ratio:
            cells.append(f"{med['mix'] / med['floor']:.2f}")
            cells.append(f"{min(r['times_s']['mix']) / min(r['times_s']['floor']):.2f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
