"""MPI test session: abort the whole job when a test fails on any rank.

Tests use collective assertions (``mpiutil.assert_all``) so every rank fails
together; if a rank fails alone anyway, its report is printed with a rank
prefix and ``MPI_Abort`` ends the job at once instead of letting the other
ranks wait in a collective until the launcher's timeout.
"""
import faulthandler
import os
import shutil
import sys
import tempfile

import pytest
from mpi4py import MPI


_TEST_TIMEOUT = float(os.environ.get("MPIDL_TEST_TIMEOUT") or 0)


@pytest.fixture(autouse=True)
def _test_watchdog():
    """With ``MPIDL_TEST_TIMEOUT=s`` set (scripts/mutation.sh sets it): a test still running after
    s seconds ends its rank (faulthandler exits 1; its stack dump is visible with ``-s``, pytest
    captures it otherwise) and mpiexec then ends the others, so a planted bug that hangs a collective
    fails in s seconds, not at the launcher's timeout.  Off by default (the launcher timeout of
    tests/test_mpi_suite.py covers normal runs)."""
    if _TEST_TIMEOUT <= 0:
        yield
        return
    faulthandler.dump_traceback_later(_TEST_TIMEOUT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


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
