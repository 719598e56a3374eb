"""``mpidl shard``: write a dataset's per-agent HDF5 shard file, or describe one (no MPI)."""
import os

import numpy as np

from mpidl import data
from mpidl.errors import MpidlError

HELP = "split a dataset over N agents into one HDF5 shard file (or --info FILE)"
NEEDS_MPI = False


def add_arguments(p):
    p.add_argument("--info", metavar="FILE", help="print the agents' sizes and class histograms of FILE")
    p.add_argument("--dataset", choices=data.DATASETS, default="fashion-mnist")
    p.add_argument("--agents", type=int, help="number of agents (= MPI ranks of the training job)")
    p.add_argument("--partition", choices=data.SCHEMES, default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (dirichlet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="folder with the dataset files "
                   "(default: $MPIDL_DATA, then /usr/share/datasets/NAME)")
    p.add_argument("--n", type=int, default=None, help="training samples (synthetic datasets)")
    p.add_argument("--dim", type=int, default=None, help="input dimension (synthetic datasets)")
    p.add_argument("--noise", type=float, default=None, help="noise level (synthetic-lsq)")
    p.add_argument("--compression", type=int, default=1, choices=range(10), metavar="0-9",
                   help="gzip level for the inputs (0: none; default 1)")
    p.add_argument("--out", help="shard file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def print_info(path):
    info = data.shard_info(path)
    a = info["attrs"]
    if a.get("partition") != "dirichlet":
        a["alpha"] = "-"
    print(f"{path}: dataset {a.get('dataset')}, {a.get('num_agents')} agents, partition {a.get('partition')}"
          f" (seed {a.get('seed')}, alpha {a.get('alpha')}), input shape {tuple(a.get('input_shape', ()))}, "
          f"{a.get('num_classes')} classes, test set {info['test_size']}")
    sizes, hist = info["sizes"], info["class_histogram"]
    total = sum(sizes)
    print(f"train samples {total}: per agent min {min(sizes)}, max {max(sizes)}, mean {total / len(sizes):.1f}")
    show_hist = hist.ndim == 2 and hist.shape[1] > 0
    if show_hist:
        print("agent    size  " + " ".join(f"{c:>6d}" for c in range(hist.shape[1])) + "   (samples per class)")
    for i, n in enumerate(sizes):
        line = f"{i:5d} {n:7d}"
        if show_hist:
            line += "  " + " ".join(f"{v:6d}" for v in hist[i])
        print(line)
    return 0


def main(comm, args):
    if args.info:
        return print_info(args.info)
    if not args.agents or args.agents < 1:
        raise MpidlError("give --agents N (N >= 1), or --info FILE")
    if not args.out:
        raise MpidlError("give --out FILE for the shard file")
    if os.path.exists(args.out) and not args.force:
        raise MpidlError(f"{args.out} exists; pass --force to replace it")
    kw = {k: v for k, v in (("n", args.n), ("dim", args.dim), ("noise", args.noise)) if v is not None}
    if kw and not args.dataset.startswith("synthetic"):
        raise MpidlError(f"--n/--dim/--noise apply to the synthetic datasets, not {args.dataset}")
    ds = data.load_dataset(args.dataset, args.data_dir, seed=args.seed, **kw)
    parts = data.partition(ds.y_train, args.agents, args.partition, seed=args.seed, alpha=args.alpha)
    data.write_shards(args.out, ds, parts, seed=args.seed, partition=args.partition,
                      alpha=args.alpha if args.partition == "dirichlet" else None,
                      compression=args.compression, dataset_options=kw)
    sizes = np.array([len(p) for p in parts])
    print(f"wrote {args.out}: {args.dataset}, {args.agents} agents ({args.partition}), "
          f"{sizes.sum()} training samples (per agent {sizes.min()}..{sizes.max()}), test set {len(ds.y_test)}")
    return 0
