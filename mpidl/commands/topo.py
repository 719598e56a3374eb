"""``mpidl topo NAME N``: print a topology's weights, degrees and spectral gap (no MPI)."""
import numpy as np

from mpidl import topology as T

HELP = "show a topology: weight matrix (or summary), degrees, spectral gap"
NEEDS_MPI = False


def add_arguments(p):
    p.add_argument("name", choices=sorted(T.GENERATORS), help="topology generator")
    p.add_argument("n", type=int, help="number of agents")
    p.add_argument("--weights", choices=T.WEIGHT_RULES, default=None,
                   help="weight rule (default: metropolis; uniform for exponential)")
    p.add_argument("--p", type=float, default=0.5, help="edge probability (erdos_renyi)")
    p.add_argument("--seed", type=int, default=0, help="seed (erdos_renyi)")
    p.add_argument("--shape", type=str, default=None, help="torus shape RxC, e.g. 2x4")
    p.add_argument("--max-print", type=int, default=16,
                   help="print the full matrix up to this many agents (default 16)")


def build(args):
    kw = {}
    if args.name == "erdos_renyi":
        kw.update(p=args.p, seed=args.seed)
    if args.name == "torus" and args.shape:
        try:
            kw["shape"] = tuple(int(v) for v in args.shape.lower().split("x"))
        except ValueError:
            raise T.TopologyError(f"--shape must look like 2x4, got {args.shape!r}") from None
    return T.make(args.name, args.n, weights=args.weights, **kw)


def main(comm, args):
    topo = build(args)
    print(topo.summary())
    n = topo.size
    if n <= args.max_print:
        with np.printoptions(precision=4, suppress=True, linewidth=160):
            print("weights (row i = what agent i applies to what it receives):")
            print(topo.weights)
        for i in range(n):
            print(f"  agent {i}: self {topo.self_weight(i):.4f}, in {list(topo.in_neighbors(i))}, "
                  f"out {list(topo.out_neighbors(i))}")
    else:
        degs = np.array([topo.degree(i) for i in range(n)])
        vals, counts = np.unique(degs, return_counts=True)
        print("in-degree histogram: " + ", ".join(f"{v}: {c}" for v, c in zip(vals, counts)))
        sw = np.diag(topo.weights)
        print(f"self weight min/mean/max: {sw.min():.4f}/{sw.mean():.4f}/{sw.max():.4f}")
    print(f"spectral gap 1 - |lambda_2| = {topo.spectral_gap():.6f}")
    return 0
