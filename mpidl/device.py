"""Which torch device each rank trains on, decided once per rank at setup.

``[run] device`` is ``"cpu"`` (the default), ``"cuda"`` or ``"auto"`` (cuda
when every rank sees a CUDA device, else the CPU everywhere).  A rank on a
node with several GPUs takes

    cuda:(node-local rank mod visible devices)

where the node-local rank comes from an MPI shared-memory split
(``Split_type(COMM_TYPE_SHARED)``) or, when Slurm numbers the tasks of every
node 0..n-1 consistently, from ``SLURM_LOCALID`` (so the choice follows
Slurm's CPU/GPU affinity).  ``CUDA_VISIBLE_DEVICES`` is honoured through
torch's visible device count, and Slurm's ``--gpus-per-task=1`` leaves one
visible device per task, so every task takes ``cuda:0``, its own GPU.  Two
ranks on the same physical GPU (more ranks per node than GPUs) is a warning
naming the ranks, not an error.

The selection itself is pure (:func:`node_local_rank`, :func:`select_device`,
:func:`shared_devices`) and unit-tested with mocked environments;
:func:`resolve_device` is the Collective part: it gathers every rank's
choice, so all ranks agree, logs which rank uses which device on which host
(rank 0), and raises the same :class:`~mpidl.errors.MpidlError` on every rank
when ``device = "cuda"`` and some rank has no CUDA device.

What a device means for the algorithms (design choice, see docs/clusters.md):
the algorithms keep their flat state on the host as NumPy arrays, exactly as
on the CPU; :class:`~mpidl.flat.FlatModel` keeps the module, the batches and
the autograd graph on the device and stages parameters and gradients through
one contiguous pinned host buffer each way per step.  The comm layer only
ever sees host buffers.

Families that have no torch device path (NEXT, pdADMM and the convex Numba
oracles) run on the CPU: ``device = "cuda"`` there logs one warning saying so
and the run proceeds on the CPU.  A family opts in by giving its algorithm
factory the attribute ``torch_device = True``.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from mpidl.errors import MpidlError

log = logging.getLogger("mpidl.device")

__all__ = ["DEVICES", "DeviceChoice", "DeviceError", "node_local_rank", "select_device", "shared_devices",
           "cpu_only_reason", "resolve_device"]

DEVICES = ("cpu", "cuda", "auto")


class DeviceError(MpidlError):
    """The requested device cannot be used (raised on every rank)."""


@dataclass(frozen=True)
class DeviceChoice:
    """Local. One rank's device: ``device`` ("cpu" or "cuda:i"), ``physical`` (what the
    index means on the node: a CUDA_VISIBLE_DEVICES entry or the GPU's UUID), ``error``
    (why the requested device is impossible on this rank, or "")."""

    device: str
    local_rank: int
    local_size: int
    physical: str = ""
    error: str = ""


def node_local_rank(shm_rank: int, shm_size: int, slurm_localids) -> int:
    """Local (pure). This rank's node-local index.

    ``slurm_localids`` lists ``SLURM_LOCALID`` (a string or None) of every rank
    on the node, in shared-memory-split order.  They are used only when they
    number the node's ranks 0..n-1 exactly once each (``srun`` tasks); ranks
    started by ``mpiexec`` inside a batch script inherit the batch step's
    ``SLURM_LOCALID=0``, and then the split rank is used.
    """
    ids = []
    for s in slurm_localids:
        try:
            ids.append(int(s))
        except (TypeError, ValueError):
            return int(shm_rank)
    if len(ids) == shm_size and sorted(ids) == list(range(shm_size)):
        return ids[shm_rank]
    return int(shm_rank)


def _visible_list(env) -> list | None:
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    return [s.strip() for s in raw.split(",") if s.strip()]


def select_device(requested: str, local_rank: int, local_size: int, n_visible: int, env,
                  host: str = "") -> DeviceChoice:
    """Local (pure). The device of one rank from its node-local rank and size, the number of CUDA
    devices it sees (``torch.cuda.device_count()``, which honours ``CUDA_VISIBLE_DEVICES``) and
    its environment ``env`` (a mapping).

    cpu -> cpu.  cuda/auto with devices -> ``cuda:(local_rank mod n_visible)``.  cuda without
    a device -> a choice carrying an error message; auto without one -> cpu.
    """
    if requested not in DEVICES:
        raise DeviceError(f"[run] device must be one of {', '.join(DEVICES)}, got {requested!r}")
    local_rank, local_size, n_visible = int(local_rank), int(local_size), int(n_visible)
    if requested == "cpu":
        return DeviceChoice("cpu", local_rank, local_size)
    if n_visible < 1:
        if requested == "auto":
            return DeviceChoice("cpu", local_rank, local_size)
        vis = env.get("CUDA_VISIBLE_DEVICES")
        why = (f"CUDA_VISIBLE_DEVICES={vis!r} hides every device" if vis is not None and not _visible_list(env)
               else "torch sees no CUDA device (no GPU, no driver, or a CPU-only torch build)")
        where = f" on {host}" if host else ""
        return DeviceChoice("cpu", local_rank, local_size,
                            error=f"[run] device = \"cuda\" but {why}{where}; "
                                  "use device = \"cpu\" or \"auto\", or run on a GPU node")
    index = local_rank % n_visible
    vis = _visible_list(env)
    physical = vis[index] if vis is not None and index < len(vis) else str(index)
    return DeviceChoice(f"cuda:{index}", local_rank, local_size, physical=physical)


def shared_devices(entries) -> list:
    """Local (pure). ``[(host, physical, [ranks])]`` of every GPU used by more than one rank.

    ``entries`` is ``[(rank, host, device, physical)]`` for all ranks; CPU ranks are ignored.
    """
    by = {}
    for rank, host, device, physical in entries:
        if device == "cpu":
            continue
        by.setdefault((host, physical), []).append(int(rank))
    return [(h, p, sorted(r)) for (h, p), r in sorted(by.items()) if len(r) > 1]


def _torch_device_family(cfg) -> bool:
    from mpidl import config as C
    from mpidl.layouts import CONVEX_MODELS
    if cfg.model.name in CONVEX_MODELS:
        return False
    _, factory = C.algorithm_registry()[cfg.algorithm.name]
    return bool(getattr(factory, "torch_device", False))


def cpu_only_reason(cfg) -> str | None:
    """Local. Why ``cfg``'s family runs on the CPU whatever the device (None: it has a device path)."""
    from mpidl.layouts import CONVEX_MODELS
    if cfg.model.name in CONVEX_MODELS:
        return f"model {cfg.model.name!r} uses the Numba convex oracles, which run on the CPU"
    if not _torch_device_family(cfg):
        return f"{cfg.algorithm.name} runs its Numba CPU kernels and has no torch device path"
    return None


def _physical_id(torch, index: int, fallback: str) -> str:
    try:
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:  # noqa: BLE001 (an old torch without the property: fall back to the index)
        uuid = None
    return str(uuid) if uuid is not None else fallback


def resolve_device(cfg, world):
    """Collective over ``world``. Decide this rank's torch device for ``cfg``; returns a ``torch.device``.

    ``device = "cpu"`` makes no MPI call and touches no CUDA API (today's CPU
    path, unchanged).  Otherwise the ranks split by shared memory, every rank
    selects (:func:`select_device`), the choices are gathered so that every
    rank raises the same error, ``auto`` becomes cuda only when every rank has
    a device, rank 0 logs one line per rank (rank, device, host) and warns when
    ranks share a GPU.
    """
    import torch

    requested = cfg.run.device
    if requested == "cpu":
        return torch.device("cpu")
    rank = world.Get_rank()
    reason = cpu_only_reason(cfg)
    if reason is not None:
        if rank == 0:
            if requested == "cuda":
                log.warning("[run] device = \"cuda\": %s; this run uses the CPU", reason)
            else:
                log.info("device auto: %s; using the CPU", reason)
        return torch.device("cpu")
    host = socket.gethostname()
    from mpidl.comm.core import allgather_objects, node_split
    shm_rank, shm_size, localids = node_split(world, os.environ.get("SLURM_LOCALID"))
    local = node_local_rank(shm_rank, shm_size, localids)
    n_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    choice = select_device(requested, local, shm_size, n_visible, os.environ, host=host)
    physical = choice.physical
    if choice.device != "cpu":
        physical = _physical_id(torch, int(choice.device.split(":")[1]), physical)
    rows = allgather_objects(world, (rank, host, choice.device, physical, choice.error))
    errors = [(r, e) for r, _, _, _, e in rows if e]
    if errors:
        first = errors[0][1]
        more = f" ({len(errors)} of {len(rows)} ranks, first rank {errors[0][0]})" if len(rows) > 1 else ""
        raise DeviceError(first + more)
    if requested == "auto" and any(d == "cpu" for _, _, d, _, _ in rows):
        if rank == 0:
            cpu = [r for r, _, d, _, _ in rows if d == "cpu"]
            log.info("device auto: rank(s) %s see no CUDA device; every rank uses the CPU",
                     ", ".join(map(str, cpu[:8])) + (" ..." if len(cpu) > 8 else ""))
        return torch.device("cpu")
    if rank == 0:
        for r, h, d, p, _ in rows[:64]:
            log.info("device: rank %d uses %s (%s) on %s", r, d, f"GPU {p}" if d != "cpu" else "host", h)
        if len(rows) > 64:
            log.info("device: ... %d more ranks", len(rows) - 64)
        for h, p, ranks in shared_devices([(r, h, d, p) for r, h, d, p, _ in rows]):
            log.warning("device: ranks %s share GPU %s on %s (more ranks than GPUs on the node): they "
                        "time-share it; use one rank per GPU (srun --gpus-per-task=1) for speed",
                        ", ".join(map(str, ranks)), p, h)
    dev = torch.device(choice.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev
