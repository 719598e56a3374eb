"""Shared test set-up: make ``tests/`` importable (``import reference``)."""
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# MPICH segments leaked by the tests that kill ranks are removed at the end of the session
# (tests/shm_orphans.py); not inside the ranks that tests/mpi/run.py starts.
_IN_RANK = any(v in os.environ for v in ("PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"))


def pytest_sessionstart(session):
    if not _IN_RANK:
        import shm_orphans
        session.config._mpich_segments_before = shm_orphans.segments()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_mpich_segments_before", None)
    if before is not None:
        import shm_orphans
        n = shm_orphans.remove_orphans(before)
        if n:
            print(f"\n[tests] removed {n} orphaned MPICH shared-memory segment(s) "
                  "(new since the session began, used by no process)")
