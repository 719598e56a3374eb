"""A step-time model per family: t_step(N) = t_compute + t_comm(N) (docs/scaling.md, issue 29).

Pure functions, no MPI, no torch: ``tests/test_scaling_model.py`` checks the formulas on
hand-computed cases and that docs/scaling.md's projection table is what :func:`projection_rows`
gives.

The model, for one rank per node and N nodes::

    t_comm    = wire * link_bytes(N) * 8 / rate  +  alpha * rounds(N)
    t_step    = t_compute + t_comm - overlap * min(t_compute, t_comm)

* ``link_bytes``: bytes one node's link carries per step, in one direction, averaged over the
  steps of a period (a broadcast every tau_G steps costs 1/tau_G of it per step).  Links are full
  duplex and every node has its own, so the busiest node's outgoing bytes set the time.
* ``rounds``: messages on the critical path per step (latency-bound rounds); the sends of one
  neighbour mix go out together, so a mix is one round, whatever the degree.
* Collectives as MPICH runs them for large messages: allreduce = reduce-scatter + allgather
  (Rabenseifner: 2 (N-1)/N S bytes per node, 2 log2 N rounds; Thakur, Rabenseifner and Gropp,
  "Optimization of collective communication operations in MPICH", IJHPCA 2005); broadcast =
  scatter + allgather (van de Geijn: the same bytes, log2 N + log2 N rounds).
* ``wire``: framing overhead on the link (1 on a fabric whose rate is quoted as payload rate;
  1514/1448 for TCP over Ethernet with a 1500-byte MTU, the emulated links' case).
* ``overlap`` in [0, 1]: the fraction of the shorter of compute and communication hidden under
  the other (0: they add; 1: the step is max(compute, comm)).

``counted_bytes`` gives what mpidl's own counters charge per rank per step (mpidl/comm: an
allreduce is charged 2 (N-1)/N S, a broadcast (N-1) S at the root only, a mix S per
out-neighbour), so the pattern can be checked against a run's ``bytes_sent``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

FAMILIES = ("cdmsgd", "centralized", "fedavg", "lsgd", "easgd", "fdg", "next")
TCP_WIRE = 1514 / 1448       # Ethernet + IPv4 + TCP (timestamps) headers per 1448-byte payload


@dataclass(frozen=True)
class Workload:
    """What one step of a family moves.  ``model_bytes``: S, the parameter vector in bytes.
    ``act_bytes``: fdg, one activation batch at a cut (batch x width x itemsize).  ``stages``: fdg's
    K.  Periods: ``local_steps`` (FedAvg H), ``tau_G`` (LSGD), ``tau`` (EASGD).  ``degree``: the
    neighbour-mix graph's out-degree (ring: 2)."""
    model_bytes: float
    act_bytes: float = 0.0
    stage_bytes: float = 0.0     # fdg: the largest stage's parameters in bytes (0: model_bytes / stages)
    stages: int = 2
    local_steps: int = 10
    tau_G: int = 16
    tau: int = 4
    degree: int = 2


@dataclass(frozen=True)
class Fabric:
    """A link: ``rate`` in bit/s, ``alpha`` in seconds per message round, ``wire`` framing factor."""
    name: str
    rate: float
    alpha: float
    wire: float = 1.0


def log2c(n: int) -> int:
    """ceil(log2 n) for n >= 1 (rounds of a recursive-doubling/halving phase)."""
    return (int(n) - 1).bit_length()


def allreduce(nbytes: float, n: int):
    """(link bytes per node, rounds) of one large-message allreduce of ``nbytes`` over n nodes."""
    if n <= 1:
        return 0.0, 0
    return 2.0 * (n - 1) / n * nbytes, 2 * log2c(n)


def bcast(nbytes: float, n: int):
    """(link bytes per node, rounds) of one large-message broadcast (scatter + allgather)."""
    if n <= 1:
        return 0.0, 0
    if n == 2:
        return float(nbytes), 1
    return 2.0 * (n - 1) / n * nbytes, 2 * log2c(n)


def traffic(family: str, n: int, w: Workload):
    """Per step: (link bytes of the busiest node, rounds, bytes mpidl's counters charge per rank).

    The small control messages (LSGD's MINLOC election: 16 bytes) are left out of the bytes
    and kept in the rounds."""
    S = float(w.model_bytes)
    if n <= 1:
        return 0.0, 0.0, 0.0
    if family in ("cdmsgd", "cdsgd", "next"):
        d = min(w.degree, n - 1)            # a 2-ring has one neighbour
        vec = 2 if family == "next" else 1   # NEXT mixes the iterate and the tracker in one message
        return d * vec * S, 1.0, d * vec * S
    if family == "centralized":
        b, r = allreduce(S, n)
        return b, float(r), b
    if family in ("fedavg", "easgd"):
        period = w.local_steps if family == "fedavg" else w.tau
        b, r = allreduce(S, n)
        return b / period, r / period, b / period
    if family == "lsgd":
        b, r = bcast(S, n)
        _, re = allreduce(16, n)            # the election
        return b / w.tau_G, (r + re) / w.tau_G, (n - 1) / n * S / w.tau_G
    if family == "fdg":
        K = w.stages
        M = max(n // K, 1)
        b, r = allreduce(w.stage_bytes or S / K, M)   # the largest stage's gradients over its M replicas
        p2p = w.act_bytes if K > 1 else 0.0  # activations forward or their gradients back
        # counted, averaged over ranks: the K - 1 cuts each carry one activation and one gradient
        # per step; the replicas' allreduces of all stages together charge 2 (M-1)/M S / K per rank
        counted = p2p * 2 * (K - 1) / K + allreduce(S, M)[0] / K
        return p2p + b, (1.0 if K > 1 else 0.0) + r, counted
    raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")


def t_comm(family: str, n: int, w: Workload, fab: Fabric) -> float:
    """Seconds of communication per step on ``fab``."""
    link, rounds, _ = traffic(family, n, w)
    return fab.wire * link * 8.0 / fab.rate + fab.alpha * rounds


def t_step(t_compute: float, t_comm_s: float, overlap: float = 0.0) -> float:
    """Seconds per step: compute + communication, less the overlapped part."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    return t_compute + t_comm_s - overlap * min(t_compute, t_comm_s)


def efficiency(family, n, w, fab, t_compute, overlap=0.0) -> float:
    """Parallel efficiency: t_compute / t_step(N) (1 = communication costs nothing)."""
    return t_compute / t_step(t_compute, t_comm(family, n, w, fab), overlap)


# ---- projections (docs/scaling.md) ------------------------------------------------------------
# Fabrics: payload rates; alpha per message round from published figures (docs/scaling.md,
# "Fabrics"): 10 GbE and 100 GbE with MPI over kernel TCP, 200 Gbit/s InfiniBand HDR with RDMA.
FABRICS = (
    Fabric("10 Gbit/s Ethernet (TCP)", 10e9, 30e-6),
    Fabric("100 Gbit/s Ethernet (TCP)", 100e9, 15e-6),
    Fabric("200 Gbit/s InfiniBand HDR", 200e9, 1.5e-6),
)
# Models: ResNet-20 (0.27M float32 parameters; CIFAR-10 batch 128) on one GPU per node, and the
# fmnist MLP 784-256-256-128-10 (300,938 parameters, batch 128) on one CPU node.  Per-node compute
# times are assumptions stated in docs/scaling.md ("Projections").
MODELS = (
    ("ResNet-20", Workload(model_bytes=0.27e6 * 4, act_bytes=128 * 32 * 16 * 16 * 4), 0.020),
    ("fmnist MLP", Workload(model_bytes=300_938 * 4, act_bytes=128 * 256 * 4), 0.002),
)
NODES = (16, 64, 256, 1024)


def projection_rows(models=MODELS, fabrics=FABRICS, nodes=NODES, families=FAMILIES, overlap=0.0):
    """Rows (model, fabric, family, [efficiency at each node count]) of the projection table."""
    rows = []
    for mname, w, tc in models:
        for fab in fabrics:
            for fam in families:
                rows.append((mname, fab.name, fam, [efficiency(fam, n, w, fab, tc, overlap) for n in nodes]))
    return rows


def projection_table(rows=None, nodes=NODES) -> str:
    """The projection table as Markdown (docs/scaling.md between its table markers)."""
    rows = projection_rows() if rows is None else rows
    head = "| model | fabric | family | " + " | ".join(f"N={n}" for n in nodes) + " |"
    sep = "|" + "---|" * (3 + len(nodes))
    lines = [head, sep]
    for m, f, fam, effs in rows:
        lines.append(f"| {m} | {f} | {fam} | " + " | ".join(f"{e:.2f}" for e in effs) + " |")
    return "\n".join(lines)


def plot(path, models=MODELS, fabrics=FABRICS, families=FAMILIES, overlap=0.0):
    """Efficiency vs nodes per family, one panel per (model, fabric): docs/img/scaling_efficiency.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [2 ** k for k in range(1, 11)]
    fig, axes = plt.subplots(len(models), len(fabrics), figsize=(4 * len(fabrics), 3.2 * len(models)),
                             sharex=True, sharey=True, squeeze=False)
    for i, (mname, w, tc) in enumerate(models):
        for j, fab in enumerate(fabrics):
            ax = axes[i][j]
            for fam in families:
                ax.plot(ns, [efficiency(fam, n, w, fab, tc, overlap) for n in ns], marker=".", label=fam)
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{mname}, {tc * 1e3:g} ms/step\n{fab.name}, alpha {fab.alpha * 1e6:g} us", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("nodes (1 rank each)")
            if j == 0:
                ax.set_ylabel("efficiency t_compute / t_step")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Modelled parallel efficiency (benchmarks/scaling_model.py; overlap 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "plot":
        plot(sys.argv[2] if len(sys.argv) > 2 else "docs/img/scaling_efficiency.png")
    else:
        print(projection_table())
