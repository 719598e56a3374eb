"""The test session's clean-up of leaked MPICH segments removes orphans only (tests/shm_orphans.py)."""
import mmap
import os
from pathlib import Path

import pytest

import shm_orphans

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")


def _make(name, size=4096):
    path = Path("/dev/shm") / name
    path.write_bytes(b"\0" * size)
    return path


def test_removes_new_orphans_keeps_old_mapped_and_open(tmp_path):
    tag = f"mpidltest_{os.getpid()}"
    old = _make(f"mpich_shm_{tag}_old_0")
    before = shm_orphans.segments()
    assert old.name in before
    orphan = _make(f"mpich_shm_{tag}_orphan_0")
    vci = _make(f"mpich_vci_{tag}_orphan_0")
    mapped = _make(f"mpich_shm_{tag}_mapped_0")
    opened = _make(f"mpich_shm_{tag}_open_0")
    other = _make(f"other_{tag}_0")                  # not an MPICH segment
    paths = [old, orphan, vci, mapped, opened, other]
    try:
        with open(mapped, "r+b") as f, open(opened, "rb") as g:
            m = mmap.mmap(f.fileno(), 4096)
            f.close()                                 # mapped, no longer open
            try:
                assert shm_orphans.remove_orphans(before) >= 2
            finally:
                m.close()
            assert g.read(1) == b"\0"
        assert not orphan.exists() and not vci.exists()
        assert old.exists() and mapped.exists() and opened.exists() and other.exists()
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
