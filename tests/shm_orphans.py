"""Local. Remove the shared-memory segments that MPICH leaks when a test kills its ranks.

MPICH names its node-wide segment ``/dev/shm/mpich_shm_<world id>_<node>`` (and ``mpich_vci_...``),
with the world id derived from the process manager's job id, and unlinks it in ``MPI_Finalize``.
A rank killed by a test (SIGKILL, an abort, a timeout) leaves it behind. Leaked segments hold
memory (tmpfs), and under ``srun --mpi=pmi2`` the job id is ``<Slurm job id>.<step id>``: a later
job with the same id (a Slurm restarted with fresh state, a requeued job) attaches the stale
segment and its ``MPI_Init`` fails or hangs (docs/clusters.md, "Stale MPICH segments").

The test session snapshots the segments at its start and, at its end, removes the new ones that
no process has mapped or open: those are orphans by construction (MPICH keeps its segment mapped
while a rank lives). Segments that existed before the session are never touched.
"""
import os
from pathlib import Path

SHM = Path("/dev/shm")
PREFIXES = ("mpich_shm_", "mpich_vci_")


def segments():
    """Local. The names of the MPICH segments in /dev/shm (empty where there is no /dev/shm)."""
    try:
        return {p.name for p in SHM.iterdir() if p.name.startswith(PREFIXES)}
    except OSError:
        return set()


def in_use():
    """Local. The /dev/shm names that some process (that we may inspect) has mapped or open."""
    used = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                i = line.find("/dev/shm/")
                if i >= 0:
                    used.add(line[i + 9:].split(" (deleted)")[0])
            fds = list((proc / "fd").iterdir())
        except OSError:    # the process ended, or is not ours to inspect
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:    # closed meanwhile
                continue
            if target.startswith("/dev/shm/"):
                used.add(target[9:])
    return used


def remove_orphans(before):
    """Local. Remove the MPICH segments not in ``before`` that nobody uses; return their count."""
    gone = 0
    for name in sorted(segments() - set(before) - in_use()):
        try:
            (SHM / name).unlink()
            gone += 1
        except OSError:
            pass
    return gone
