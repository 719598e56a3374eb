"""Launcher / MPI mismatch rules (mpidl/launch.py), from environments alone (serial, issue 10)."""
import pytest

from mpidl.launch import launch_mismatch

MPICH = "MPICH Version:      4.2.0\nMPICH Release date: ..."
OMPI = "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022"
CRAY = "MPI VERSION    : CRAY MPICH version 8.1.27.26 (ANL base 3.4a2)"


@pytest.mark.parametrize("env,size,lib,want", [
    # after MPI_Init: a world of 1 while the launcher started N > 1 tasks
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}, 1, MPICH, ("srun --mpi=pmi2", 2)),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"}, 1, OMPI, ("srun --mpi=pmix", 0)),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"}, 1, CRAY, ("srun --mpi=cray_shasta", 0)),
    ({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "1"}, 1, MPICH, ("mpiexec of MPICH 4.2.0", 1)),
    ({"PMI_SIZE": "2", "PMI_RANK": "0"}, 1, OMPI, ("mpiexec of Open MPI v4.1.4", 0)),
    ({"MPI_LOCALNRANKS": "2"}, 1, OMPI, ("mpiexec of Open MPI", None)),
    # consistent launches
    ({"SLURM_STEP_NUM_TASKS": "4", "PMI_SIZE": "4"}, 4, MPICH, None),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "8"}, 1, MPICH, None),   # one srun task
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, 1, MPICH, None),          # the batch script itself
    ({}, 1, MPICH, None),                                                  # python -m mpidl ...
    ({"SLURM_STEP_NUM_TASKS": "4", "MPIDL_ALLOW_SINGLETON": "1"}, 1, MPICH, None),
    # before MPI_Init (size None): only what would make MPI_Init itself fail
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, None, MPICH, ("Open MPI's mpiexec", 0)),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, None, OMPI, None),                     # Open MPI under its own mpiexec
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, None, OMPI, ("srun --mpi=pmix", 1)),
    ({"SLURM_STEP_NUM_TASKS": "2", "PMIX_RANK": "1"}, None, OMPI, None),   # srun --mpi=pmix
    ({"SLURM_STEP_NUM_TASKS": "2", "PMI_FD": "5"}, None, OMPI, None),      # srun --mpi=pmi2
    ({"SLURM_STEP_NUM_TASKS": "2"}, None, MPICH, None),                    # MPICH: decided after init
    ({"PMI_SIZE": "2"}, None, OMPI, None),
])
def test_launch_mismatch(env, size, lib, want):
    got = launch_mismatch(size, lib, environ=env)
    if want is None:
        assert got is None, got
    else:
        msg, rank = got
        assert want[0] in msg and rank == want[1], got
        assert "\n" not in msg and "separate copies" in msg
