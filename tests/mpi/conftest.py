"""MPI test session: abort the whole job when a test fails on any rank.

Tests use collective assertions (``mpiutil.assert_all``) so every rank fails
together; if a rank fails alone anyway, its report is printed with a rank
prefix and ``MPI_Abort`` ends the job at once instead of letting the other
ranks wait in a collective until the launcher's timeout.
"""
import os
import shutil
import sys
import tempfile

import pytest
from mpi4py import MPI


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture
def shared_tmp():
    """A temporary folder made by rank 0, the same path on every rank, removed afterwards."""
    world = MPI.COMM_WORLD
    path = world.bcast(tempfile.mkdtemp(prefix="mpidl-test-") if world.Get_rank() == 0 else None)
    yield path
    world.Barrier()
    if world.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def gc():
    """A GraphComm on a ring over all ranks."""
    from mpidl import topology as T
    from mpidl.comm import GraphComm
    world = MPI.COMM_WORLD
    with GraphComm(world, T.ring(world.Get_size())) as g:
        yield g


def pytest_runtest_logreport(report):
    world = MPI.COMM_WORLD
    if report.failed and world.Get_size() > 1:
        rank = world.Get_rank()
        text = str(report.longrepr)
        sys.stderr.write(f"[rank {rank:03d}] FAILED {report.nodeid} ({report.when})\n")
        sys.stderr.write("".join(f"[rank {rank:03d}] {ln}\n" for ln in text.splitlines()))
        sys.stderr.flush()
        world.Abort(1)
