"""One MPI program for the multi-node checks (tests/cluster/multinode_checks.py): run it under
an emulated cluster's DIR/mpiexec (scripts/cluster/vnodes.sh) and under plain mpiexec on one
node, then compare what the two wrote.

    MPIEXEC -n 4 python tests/cluster/multinode_run.py OUT [--families a,b,...] [--no-link] [--groups G]

It writes, into OUT (rank 0 writes the JSON; the runs write their checkpoints):
* ``placement.json``: per rank, the host name, the node facts as mpidl computes them
  (:func:`mpidl.comm.core.node_info`), the device each rank would take with 1 and 2 visible GPUs
  (:func:`mpidl.device.select_device`, the function ``[run] device`` uses), and what LSGD's
  ``groups = "node"`` makes of the world (:class:`mpidl.comm.leader.LeaderComm`: group, group
  leader, number of groups, the local and the global election);
* ``link.json``: seconds for a message from rank 0 to the last rank (another node when there are
  several) and to rank 1 (the same node), and the bytes sent;
* ``FAMILY/``: one short training run per family (its checkpoint at the last step), with the
  final metrics in ``families.json``. ``lsgd_groups`` is multi-leader LSGD with ``groups = G``:
  "node" across nodes, "size:2" for the one-node run that forms the same groups.
"""
import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import mpidl.config as C  # noqa: E402
from mpidl import topology as T  # noqa: E402
from mpidl.comm import GraphComm  # noqa: E402
from mpidl.comm.core import node_info  # noqa: E402
from mpidl.comm.leader import LeaderComm  # noqa: E402
from mpidl.device import select_device  # noqa: E402
from mpidl.driver import train  # noqa: E402

WORLD = MPI.COMM_WORLD
R, N = WORLD.Get_rank(), WORLD.Get_size()
STEPS = 20
BASE = ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16", "run.log_every=5", "run.eval_every=10",
        "data.eval_samples=100", f"run.steps={STEPS}", f"run.checkpoint_every={STEPS}"]
# family -> extra keys; fdg runs one replica of N stages, so that with block placement its
# stages sit on different nodes; pdADMM puts one layer on each rank.
FAMILIES = {
    "cdmsgd": ["algorithm.name=cdmsgd"],
    "centralized": ["algorithm.name=centralized", "algorithm.momentum=0.9"],
    "fedavg": ["algorithm.name=fedavg", "algorithm.local_steps=3"],
    "lsgd": ["algorithm.name=lsgd", "algorithm.tau_G=3", "algorithm.momentum=0.5"],
    "lsgd_groups": ["algorithm.name=lsgd", "algorithm.tau=2", "algorithm.tau_G=4"],   # + --groups
    "lsgd_async": ["algorithm.name=lsgd", "algorithm.asynchronous=true", "algorithm.tau_G=3"],
    "easgd": ["algorithm.name=easgd", "algorithm.momentum=0.5"],
    # cuts pinned: balanced cuts come from timings, which differ between the two runs compared
    "fdg": ["algorithm.name=fdg", f"algorithm.stages={N}", "algorithm.replicas=1", "model.hidden=[16, 12, 10]",
            f"algorithm.cuts={list(range(1, N))}"],
    "pdadmm": ["algorithm.name=pdadmm", "run.batch_size=0", "algorithm.rho=0.01", "algorithm.nu=0.01",
               "model.hidden=[16, 12, 10]"],
    "next": ["algorithm.name=next", "algorithm.tau=10.0", "run.batch_size=0", "model.dtype=float64"],
}
ASYNC = {"lsgd_async"}   # nondeterministic: compared by a finite accuracy only


def placement(out):
    info = node_info(WORLD)
    devices = {g: select_device("cuda", info.local_rank, info.local_size, g, {}).device for g in (1, 2)}
    with GraphComm(WORLD, T.complete(N)) as gc:
        lc = LeaderComm(gc, groups="node")
        try:
            # an election whose winner is known: the value is the world rank, so the group's
            # lowest rank wins locally and rank 0 globally
            local = lc.elect(float(R), scope="group")
            glob = lc.elect(float(R), scope="world")
            leader = dict(group=int(lc.group_id), group_rank=lc.grank, group_size=lc.gsize,
                          group_ranks=[int(r) for r in lc.group_ranks], n_groups=int(lc.n_groups),
                          local_winner=int(lc.group_ranks[local[1]]), global_winner=int(glob[1]))
        finally:
            lc.close()
    row = dict(rank=R, host=socket.gethostname(), local_rank=info.local_rank, local_size=info.local_size,
               node=info.node, n_nodes=info.n_nodes, node_leader=info.leader, devices=devices, lsgd=leader)
    rows = WORLD.gather(row)
    if R == 0:
        (out / "placement.json").write_text(json.dumps(rows, indent=1))


def link(out, nbytes=2_500_000, reps=3):
    """Median seconds of a blocking send of ``nbytes`` from rank 0 to the last rank and to rank 1."""
    buf = np.zeros(nbytes, np.uint8)
    res = {"bytes": nbytes}
    for name, peer in (("far", N - 1), ("near", 1)):
        times = []
        for _ in range(reps):
            WORLD.Barrier()
            t = time.perf_counter()
            if R == 0:
                WORLD.Send(buf, dest=peer, tag=7)
                WORLD.Recv(buf[:1], source=peer, tag=8)   # the receiver has everything
            elif R == peer:
                WORLD.Recv(buf, source=0, tag=7)
                WORLD.Send(buf[:1], dest=0, tag=8)
            times.append(time.perf_counter() - t)
        res[name] = float(np.median(times))
    if R == 0:
        (out / "link.json").write_text(json.dumps(res))


def families(out, names, groups):
    done = {}
    for name in names:
        extra = []
        if name == "lsgd_groups":   # "node", or "size:S" (the one-node reference of S ranks per node)
            kind, _, size = groups.partition(":")
            extra = [f'algorithm.groups="{kind}"'] + ([f"algorithm.group_size={size}"] if size else [])
        cfg = C.load(None, BASE + FAMILIES[name] + extra + [f'run.out="{out}"', f"run.name={name}"])
        t = time.perf_counter()
        m = train(cfg, WORLD)
        done[name] = dict(test_acc=float(m.get("test_acc", float("nan"))), step=int(m["step"]),
                          seconds=time.perf_counter() - t)
    if R == 0:
        (out / "families.json").write_text(json.dumps(done, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--no-link", action="store_true")
    ap.add_argument("--groups", default="node", help='lsgd_groups: "node" or "size:S"')
    a = ap.parse_args()
    out = Path(a.out)
    if R == 0:
        out.mkdir(parents=True, exist_ok=True)
    WORLD.Barrier()
    placement(out)
    if not a.no_link and N > 1:
        link(out)
    names = [f for f in a.families.split(",") if f]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        sys.exit(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    families(out, names, a.groups)


if __name__ == "__main__":
    main()
