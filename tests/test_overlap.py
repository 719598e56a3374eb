"""mpidl.comm.overlap outside MPI launches: the default, bad values, the worked example of
docs/algorithms/cdsgd.md ("Overlap with backward") run as written at 2 ranks."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mpidl import config as C
from mpidl.comm.overlap import DEFAULT_BUCKET_MB, Overlap
from test_mpi_suite import mpiexec

ROOT = Path(__file__).resolve().parent.parent


def test_config_default_is_the_comm_layers():
    assert C.CommConfig().bucket_mb == DEFAULT_BUCKET_MB
    assert C.CommConfig().progress == "none"


@pytest.mark.parametrize("kw", [{"progress": "always"}, {"bucket_mb": -1.0}, {"bucket_mb": float("nan")}])
def test_bad_overlap_settings(kw):
    with pytest.raises(ValueError):
        Overlap(**kw)


def test_docs_worked_example_runs(tmp_path):
    doc = (ROOT / "docs" / "algorithms" / "cdsgd.md").read_text()
    section = doc.split("## Overlap with backward", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 3 and lines[0].startswith("mpiexec -n 2 python -m mpidl run"), lines
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    launcher = " ".join(mpiexec())
    out = ""
    for line in lines:
        cmd = line.replace("mpiexec", launcher, 1).replace("python", sys.executable, 1) \
            if line.startswith("mpiexec") else line.replace("python", sys.executable, 1)
        proc = subprocess.Popen(cmd, shell=True, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{line} hung\n{out[-2000:]}\n{err[-2000:]}")
        assert proc.returncode == 0, f"{line}\n{out[-3000:]}\n{err[-3000:]}"
        acc = re.findall(r"finished \(done\) at step 60/60: test acc ([01]\.\d+)", out)
        if line.startswith("mpiexec"):
            assert acc and float(acc[0]) > 0.85, out[-2000:]     # the doc says "about 0.94"
    assert out.strip() == "same: True", out


class _FakeMPI:
    THREAD_SINGLE, THREAD_FUNNELED, THREAD_SERIALIZED, THREAD_MULTIPLE = 0, 1, 2, 3

    @staticmethod
    def Query_thread():
        return 2


def test_thread_mode_needs_thread_multiple(monkeypatch):
    """A lower thread level is one clear error (the same on every rank: the same MPI everywhere)."""
    import torch

    from mpidl.comm import overlap
    from mpidl.errors import MpidlError
    from mpidl.flat import FlatModel
    monkeypatch.setattr(overlap, "_mpi", lambda: _FakeMPI)
    fm = FlatModel(torch.nn.Linear(3, 2))
    with pytest.raises(MpidlError, match="MPI_THREAD_MULTIPLE.*'serialized'.*hooks"):
        Overlap("thread").attach(fm)
    Overlap("hooks").attach(fm)                  # a CPU model's hooks run on the calling thread
