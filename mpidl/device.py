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

What a device means for the algorithms (see docs/clusters.md): the model's
flat parameter and gradient buffers (:class:`~mpidl.flat.FlatModel`) live on
the device, every array of the algorithm's state is made like them
(:mod:`mpidl.xp`), so the update runs there as torch operations, written once
for NumPy and torch.  The communicators stage a device buffer through a
pinned host mirror (one copy each way per collective) or, when the MPI library
is CUDA-aware (``[comm] cuda_aware``, :func:`resolve_cuda_aware`), hand the
device memory to MPI and combine a mix on the device.

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
           "cpu_only_reason", "resolve_device", "CUDA_AWARE", "cuda_aware_support", "decide_cuda_aware",
           "resolve_cuda_aware"]

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


# -- CUDA-aware MPI ------------------------------------------------------------------------
CUDA_AWARE = ("auto", "true", "false")


def _libmpi_path() -> str | None:
    """The MPI library this process loaded (mpi4py's), from the process's memory map (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path)
                if name.startswith(("libmpi.so", "libmpi_cray.so", "libmpich.so")):
                    return path
    except OSError:
        pass
    import ctypes.util
    return ctypes.util.find_library("mpi")


def cuda_aware_support() -> bool | None:
    """Local. Whether the loaded MPI library says it can move CUDA device memory (None: it has no query).

    Asks ``MPIX_Query_cuda_support()`` (Open MPI's extension, also in MPICH >= 4.1) and
    otherwise ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &flag)`` (MPICH, Cray MPICH).
    Both answer at run time: Open MPI built with CUDA, MPICH configured with CUDA and a GPU
    present (``MPIR_CVAR_ENABLE_GPU``), Cray MPICH with ``MPICH_GPU_SUPPORT_ENABLED=1``.
    Call it after MPI is initialised.
    """
    import ctypes
    path = _libmpi_path()
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    if hasattr(lib, "MPIX_Query_cuda_support"):
        fn = lib.MPIX_Query_cuda_support
        fn.restype, fn.argtypes = ctypes.c_int, []
        return bool(fn())
    if hasattr(lib, "MPIX_GPU_query_support"):
        fn = lib.MPIX_GPU_query_support
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        flag = ctypes.c_int(0)
        return fn(0, ctypes.byref(flag)) == 0 and bool(flag.value)    # 0 = MPIX_GPU_SUPPORT_CUDA
    return None


def decide_cuda_aware(setting: str, device_type: str, supports: list) -> tuple:
    """Local (pure). ``(use, message)`` for ``[comm] cuda_aware`` given this run's device type and
    every rank's :func:`cuda_aware_support` answer (True, False or None).

    ``false`` or a CPU run: staging (a CPU run has nothing to hand over; ``true`` there is
    said in the message).  ``auto``: direct only when every rank's MPI says yes.
    ``true``: direct; the message warns when some rank's MPI says no (it may crash).
    """
    if setting not in CUDA_AWARE:
        raise DeviceError(f"[comm] cuda_aware must be auto, true or false, got {setting!r}")
    if device_type == "cpu":
        return False, ("[comm] cuda_aware = true has no effect: this run's tensors are on the CPU"
                       if setting == "true" else "")
    if setting == "false":
        return False, "comm: device buffers staged through pinned host memory ([comm] cuda_aware = false)"
    if setting == "auto":
        if supports and all(s is True for s in supports):
            return True, "comm: the MPI library is CUDA-aware: device buffers go to MPI directly"
        why = ("it reports no CUDA support" if any(s is False for s in supports)
               else "it offers no CUDA-support query")
        return False, f"comm: device buffers staged through pinned host memory (MPI: {why}; " \
                      "[comm] cuda_aware = true forces the direct path)"
    bad = [r for r, s in enumerate(supports) if s is False]
    if bad:
        return True, (f"[comm] cuda_aware = true but the MPI library of rank(s) {bad[:8]} reports no CUDA "
                      "support: passing device memory to it may crash; set cuda_aware = auto")
    return True, "comm: device buffers go to MPI directly ([comm] cuda_aware = true)"


def resolve_cuda_aware(cfg, world, device) -> bool:
    """Collective over ``world`` when the run is on a GPU (a CPU run makes no call).

    Every rank asks its MPI library (:func:`cuda_aware_support`), the answers are
    gathered, and :func:`decide_cuda_aware` gives one decision for all ranks; rank 0
    logs it (a warning when ``true`` overrides a "no").
    """
    setting = cfg.comm.cuda_aware
    if device.type == "cpu":
        use, msg = decide_cuda_aware(setting, "cpu", [])
        if msg and world.Get_rank() == 0:
            log.warning(msg)
        return use
    from mpidl.comm.core import allgather_objects
    supports = allgather_objects(world, cuda_aware_support())
    use, msg = decide_cuda_aware(setting, device.type, supports)
    if world.Get_rank() == 0 and msg:
        (log.warning if "may crash" in msg else log.info)(msg)
    return use
