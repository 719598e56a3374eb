"""Entry point for one MPI test launch: ``mpiexec -n N python tests/mpi/run.py FILE [pytest args]``.

Rank 0 reports to the terminal; ranks > 0 write to ``$MPIDL_TEST_LOGDIR/rank<N>.log``
(the launcher prints those on failure).
"""
import os
import sys

from mpi4py import MPI

rank = MPI.COMM_WORLD.Get_rank()
logdir = os.environ.get("MPIDL_TEST_LOGDIR")
if rank and logdir:
    log = open(os.path.join(logdir, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)

import pytest  # noqa: E402

rc = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "python_files=mpitest_*.py"] + sys.argv[1:])
sys.stdout.flush()
sys.exit(int(rc))
