"""Device selection (mpidl/device.py) from mocked environments, and the `device` key on the CPU.

The pure functions are checked for node-local ranks, CUDA_VISIBLE_DEVICES and Slurm's
SLURM_LOCALID / --gpus-per-task binding; resolve_device with a faked torch.cuda; the CLI
refuses device = "cuda" without CUDA with one line and exit 2 on every rank.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpidl import config as C
from mpidl import device as D

ROOT = Path(__file__).resolve().parent.parent
HAVE_CUDA = torch.cuda.is_available()


# -- node-local rank ------------------------------------------------------------------
def test_node_local_rank_uses_the_shared_memory_split_without_slurm():
    assert [D.node_local_rank(r, 3, [None, None, None]) for r in range(3)] == [0, 1, 2]


def test_node_local_rank_follows_slurm_localid_when_it_numbers_the_node():
    ids = ["2", "0", "1"]          # srun with a cyclic distribution: split order != Slurm's numbering
    assert [D.node_local_rank(r, 3, ids) for r in range(3)] == [2, 0, 1]


@pytest.mark.parametrize("ids", [["0", "0", "0"],          # mpiexec in a batch script: inherited SLURM_LOCALID=0
                                 ["0", "1", None],          # only some ranks have it
                                 ["0", "1", "x"],           # garbage
                                 ["0", "1", "3"]])          # not 0..n-1
def test_node_local_rank_ignores_an_inconsistent_slurm_localid(ids):
    assert [D.node_local_rank(r, 3, ids) for r in range(3)] == [0, 1, 2]


# -- select_device --------------------------------------------------------------------
def test_cpu_is_cpu_whatever_the_gpus():
    c = D.select_device("cpu", 1, 4, 4, {})
    assert c.device == "cpu" and not c.error


def test_ranks_take_local_rank_mod_visible_devices():
    got = [D.select_device("cuda", r, 6, 4, {}).device for r in range(6)]
    assert got == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert [D.select_device("auto", r, 2, 2, {}).device for r in range(2)] == ["cuda:0", "cuda:1"]


def test_cuda_visible_devices_gives_the_physical_gpu():
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    got = [D.select_device("cuda", r, 2, 2, env) for r in range(2)]
    assert [c.device for c in got] == ["cuda:0", "cuda:1"]
    assert [c.physical for c in got] == ["2", "3"]


def test_slurm_gpus_per_task_leaves_each_task_its_own_gpu():
    """--gpus-per-task=1: every task sees one device (its own), so every task takes cuda:0 and
    no two tasks share a GPU although the node has 4 ranks and each sees 1 device."""
    rows = []
    for localid in range(4):
        env = {"SLURM_LOCALID": str(localid), "CUDA_VISIBLE_DEVICES": str(localid)}
        local = D.node_local_rank(localid, 4, ["0", "1", "2", "3"])
        c = D.select_device("cuda", local, 4, 1, env)
        assert c.device == "cuda:0" and not c.error
        rows.append((localid, "node1", c.device, c.physical))
    assert D.shared_devices(rows) == []


def test_more_ranks_than_gpus_is_sharing_named_by_rank():
    rows = [(r, "node1", D.select_device("cuda", r, 4, 2, {}).device,
             D.select_device("cuda", r, 4, 2, {}).physical) for r in range(4)]
    rows += [(4, "node2", "cuda:0", "0")]           # same index on another host: not shared
    assert D.shared_devices(rows) == [("node1", "0", [0, 2]), ("node1", "1", [1, 3])]


def test_cuda_without_a_device_is_an_error_and_auto_falls_back():
    c = D.select_device("cuda", 0, 1, 0, {}, host="n1")
    assert c.device == "cpu" and "device = \"cuda\"" in c.error and "n1" in c.error
    hidden = D.select_device("cuda", 0, 1, 0, {"CUDA_VISIBLE_DEVICES": ""})
    assert "CUDA_VISIBLE_DEVICES=''" in hidden.error
    a = D.select_device("auto", 0, 1, 0, {})
    assert a.device == "cpu" and not a.error


def test_unknown_device_is_rejected():
    with pytest.raises(D.DeviceError, match="device must be one of"):
        D.select_device("gpu", 0, 1, 1, {})


# -- the config key ------------------------------------------------------------------------
def test_device_key_is_validated():
    assert C.load(None).run.device == "cpu"
    assert C.load(None, ["run.device=auto"]).run.device == "auto"
    with pytest.raises(C.ConfigError, match=r"\[run\] device must be cpu, cuda or auto, got 'gpu'"):
        C.load(None, ["run.device=gpu"])


# -- resolve_device (collective part) at one rank ------------------------------------------------
class _NoMPI:
    def __getattr__(self, name):
        raise AssertionError(f"device = cpu must make no MPI call (called {name})")


class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def device_log():
    h = _Catch()
    lg = logging.getLogger("mpidl.device")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    yield h.lines
    lg.removeHandler(h)
    lg.setLevel(old)


def test_cpu_makes_no_mpi_call():
    assert D.resolve_device(C.load(None), _NoMPI()).type == "cpu"


@pytest.mark.parametrize("algo", ["next", "pdadmm"])
def test_cpu_only_families_warn_once_and_run_on_the_cpu(algo, device_log):
    from mpi4py import MPI
    dev = D.resolve_device(C.load(None, [f"algorithm.name={algo}", "run.device=cuda"]), MPI.COMM_WORLD)
    assert dev.type == "cpu"
    warn = [m for lvl, m in device_log if lvl == "WARNING"]
    assert len(warn) == 1 and algo in warn[0] and "CPU" in warn[0], device_log


def test_convex_models_run_on_the_cpu(device_log):
    from mpi4py import MPI
    cfg = C.load(None, ["model.name=convex-logistic", "run.device=cuda", "data.dataset=synthetic-logistic"])
    assert D.resolve_device(cfg, MPI.COMM_WORLD).type == "cpu"
    assert any("Numba convex" in m for _, m in device_log)


@pytest.mark.skipif(HAVE_CUDA, reason="needs a machine without CUDA")
def test_cuda_without_cuda_raises(device_log):
    from mpi4py import MPI
    with pytest.raises(D.DeviceError, match=r"device = \"cuda\" but torch sees no CUDA device"):
        D.resolve_device(C.load(None, ["run.device=cuda"]), MPI.COMM_WORLD)
    assert D.resolve_device(C.load(None, ["run.device=auto"]), MPI.COMM_WORLD).type == "cpu"


def test_resolve_with_a_faked_gpu_node(monkeypatch, device_log):
    """torch.cuda faked to show 2 devices behind CUDA_VISIBLE_DEVICES=5,7: rank 0 of 1 takes
    cuda:0, which is physical GPU 5, sets it as the current device and logs it with the host."""
    from mpi4py import MPI
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: (_ for _ in ()).throw(RuntimeError()))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(str(d)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    dev = D.resolve_device(C.load(None, ["run.device=cuda", "algorithm.name=cdmsgd"]), MPI.COMM_WORLD)
    assert str(dev) == "cuda:0" and set_to == ["cuda:0"]
    import socket
    assert ("INFO", f"device: rank 0 uses cuda:0 (GPU 5) on {socket.gethostname()}") in device_log


# -- the CLI: one line, exit 2 on every rank ---------------------------------------------------
PER_RANK = ('r="${PMI_RANK:-$OMPI_COMM_WORLD_RANK}"; "$0" -m mpidl "$@" >"$D/out.$r" 2>"$D/err.$r"; '
            'echo $? >"$D/rc.$r"')


@pytest.mark.skipif(HAVE_CUDA, reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda_is_one_error_and_exit_2(tmp_path):
    from test_mpi_suite import mpiexec
    n = 2
    env = dict(os.environ, OMP_NUM_THREADS="1", D=str(tmp_path))
    proc = subprocess.run([*mpiexec(), "-n", str(n), "sh", "-c", PER_RANK, sys.executable, "run",
                           "--set", "run.device=cuda", "--set", "data.dataset=digits",
                           "--set", f'run.out="{tmp_path}"'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rcs = {r: (tmp_path / f"rc.{r}").read_text().strip() for r in range(n)}
    assert rcs == {r: "2" for r in range(n)}, rcs
    err = {r: [ln for ln in (tmp_path / f"err.{r}").read_text().splitlines() if ln.strip()] for r in range(n)}
    assert len(err[0]) == 1 and err[0][0].startswith("mpidl run: error: [run] device = \"cuda\""), err
    assert "2 of 2 ranks" in err[0][0], err[0]
    assert all(err[r] == [] for r in range(1, n)), err
    assert not (tmp_path / "cdsgd_ring").exists()       # refused before any output was written


# -- [comm] cuda_aware ---------------------------------------------------------------------
def test_cuda_aware_decision_rules():
    use, msg = D.decide_cuda_aware("auto", "cuda", [True, True])
    assert use and "directly" in msg
    use, msg = D.decide_cuda_aware("auto", "cuda", [True, False])        # one rank's MPI says no
    assert not use and "reports no CUDA support" in msg
    use, msg = D.decide_cuda_aware("auto", "cuda", [None, None])         # no query in the library
    assert not use and "no CUDA-support query" in msg
    use, msg = D.decide_cuda_aware("false", "cuda", [True, True])
    assert not use and "staged" in msg
    use, msg = D.decide_cuda_aware("true", "cuda", [None, None])
    assert use and "may crash" not in msg
    use, msg = D.decide_cuda_aware("true", "cuda", [True, False, False])
    assert use and "rank(s) [1, 2]" in msg and "may crash" in msg
    for setting in ("auto", "false"):                                    # a CPU run: nothing to hand over
        assert D.decide_cuda_aware(setting, "cpu", []) == (False, "")
    use, msg = D.decide_cuda_aware("true", "cpu", [])
    assert not use and "no effect" in msg
    with pytest.raises(D.DeviceError, match="cuda_aware must be auto, true or false"):
        D.decide_cuda_aware("yes", "cuda", [])


def test_the_loaded_mpi_answers_the_cuda_query():
    """The real query on this machine's MPI (the MPICH wheel here: no CUDA build, so False;
    a library without either query gives None)."""
    from mpi4py import MPI  # noqa: F401  (loads the library the query looks up)
    got = D.cuda_aware_support()
    assert got in (True, False, None)
    if "MPICH" in MPI.Get_library_version() and not torch.cuda.is_available():
        assert got is False


@pytest.mark.parametrize("text,want", [("true", "true"), ("false", "false"), ('"auto"', "auto")])
def test_cuda_aware_takes_toml_booleans_and_round_trips(tmp_path, text, want):
    cfg = C.load(None, [f"comm.cuda_aware={text}"])
    assert cfg.comm.cuda_aware == want
    p = tmp_path / "c.toml"
    p.write_text(f"[comm]\ncuda_aware = {text}\n")
    assert C.load(p).comm.cuda_aware == want
    assert C.Config.from_toml(p).to_toml() and C.from_dict(C.to_dict(cfg)).comm.cuda_aware == want


def test_a_cpu_run_makes_no_cuda_aware_call(device_log):
    class NoCalls:
        def __getattr__(self, name):
            raise AssertionError(f"a CPU run called world.{name}")
    assert D.resolve_cuda_aware(C.load(None, []), NoCalls(), torch.device("cpu")) is False
