"""Launcher / MPI mismatch: N tasks started, N singleton MPI worlds.

A launcher that the MPI library cannot talk to (``srun`` without a PMI
plugin on a Slurm whose ``MpiDefault`` is ``none``; Open MPI's ``mpiexec``
running an MPICH-built mpi4py, or the other way round) starts N processes that
each initialise MPI as a world of one.  They would train N separate copies
and race on the same output files.  The launcher still tells each process how
many tasks it started, in its environment:

    srun                    SLURM_STEP_NUM_TASKS, SLURM_PROCID
    Open MPI's mpiexec      OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK
    PMI launchers (Hydra)   PMI_SIZE, PMI_RANK
    MPICH's mpiexec         MPI_LOCALNRANKS, MPI_LOCALRANKID

so a world of 1 with one of these above 1 is a mismatch.  This module only
reads the environment (no MPI); :func:`mpidl.comm.check_launch` applies it.
"""
from __future__ import annotations

import os
import shutil
import sys

__all__ = ["launch_mismatch"]

# (variable with the number of tasks the launcher started, variable with this task's rank, launcher)
_LAUNCH_VARS = (
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "srun"),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "Open MPI's mpiexec"),
    ("PMI_SIZE", "PMI_RANK", "a PMI launcher (MPICH/Intel MPI mpiexec, srun --mpi=pmi2)"),
    ("MPI_LOCALNRANKS", "MPI_LOCALRANKID", "MPICH's mpiexec"),
)


def _library_name(version: str) -> str:
    first = version.strip().splitlines()[0] if version.strip() else "the MPI library"
    low = first.lower()
    if "open mpi" in low:
        return "Open MPI " + first.split()[2].rstrip(",") if len(first.split()) > 2 else "Open MPI"
    for name in ("CRAY MPICH", "Intel(R) MPI", "MVAPICH", "MPICH"):
        if name.lower() in low:
            return name + " " + next((w for w in first.split() if w[:1].isdigit()), "")
    return first[:40]


def _own_mpiexec(lib, mpicc=None) -> str:
    """The mpiexec belonging to the MPI that mpi4py was built with (best guess)."""
    if mpicc:
        path = mpicc if os.path.isabs(mpicc) else shutil.which(mpicc)
        if path:
            cand = os.path.join(os.path.dirname(path), os.path.basename(path).replace("mpicc", "mpiexec", 1))
            if os.path.exists(cand):
                return cand
    venv = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if lib.startswith("Open MPI"):
        return shutil.which("mpiexec.openmpi") or "Open MPI's mpiexec"
    if os.path.exists(venv):  # the mpich wheel's
        return venv
    return shutil.which("mpiexec.mpich") or "mpiexec"


_PMI_WIRING = ("PMI_FD", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "PMIX_NAMESPACE")


def launch_mismatch(world_size, library: str, mpicc=None, environ=None):
    """Local. ``(message, launcher_rank)`` when the launcher and the MPI library do not match;
    None when the launch looks consistent.

    ``world_size`` is ``COMM_WORLD``'s size after ``MPI_Init``: a world of 1
    while the launcher started N > 1 tasks is a mismatch.  ``world_size=None``
    asks before ``MPI_Init``, and flags only what the environment proves and
    what would make the library abort in ``MPI_Init`` itself: Open MPI's
    launcher (``OMPI_COMM_WORLD_SIZE``) for a library that is not Open MPI,
    and an Open MPI library under srun without a PMI plugin (no ``PMI_*`` or
    ``PMIX_*`` variables).  ``library`` is ``MPI.Get_library_version()``,
    ``mpicc`` the compiler mpi4py was built with, for the hint.
    ``MPIDL_ALLOW_SINGLETON=1`` turns the checks off.
    """
    env = os.environ if environ is None else environ
    if env.get("MPIDL_ALLOW_SINGLETON", "") not in ("", "0") or world_size not in (None, 1):
        return None
    lib = _library_name(library)
    openmpi = lib.startswith("Open MPI")
    for size_var, rank_var, launcher in _LAUNCH_VARS:
        try:
            n = int(env.get(size_var, ""))
        except ValueError:
            continue
        if n <= 1:
            continue
        if world_size is None:  # before MPI_Init: only the certain cases
            foreign = size_var == "OMPI_COMM_WORLD_SIZE" and not openmpi
            bare_srun = (size_var == "SLURM_STEP_NUM_TASKS" and openmpi
                         and not any(v in env for v in _PMI_WIRING))
            if not (foreign or bare_srun):
                continue
        try:
            lrank = int(env.get(rank_var, ""))
        except ValueError:
            lrank = None
        plugin = "pmix" if openmpi else ("cray_shasta" if lib.startswith("CRAY") else "pmi2")
        if launcher == "srun":
            fix = (f"pass srun --mpi={plugin} (mpi4py uses {lib}; `srun --mpi=list` shows the choices; "
                   f"jobs/*.sbatch: MPIDL_SRUN_MPI={plugin})")
        else:
            fix = (f"start it with the mpiexec of {lib}, the MPI that mpi4py was built with "
                   f"({_own_mpiexec(lib, mpicc)}), or under Slurm with srun --mpi={plugin}")
        msg = (f"{launcher} started {n} tasks ({size_var}={n}) but "
               + ("MPI would see a world of 1 in each" if world_size is None else "each one sees an MPI world of 1")
               + f", so they would train {n} separate copies: {fix}")
        return msg, lrank
    return None
