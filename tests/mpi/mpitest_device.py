"""Device selection under mpiexec (torch.cuda faked per rank): agreement, sharing, SLURM_LOCALID."""
import logging
import socket

import pytest
import torch
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import config as C
from mpidl import device as D

MPI_SIZES = (1, 2, 3)
MPI_TIMEOUT = 120
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()


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


def _fake_gpus(monkeypatch, n, set_to=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: (_ for _ in ()).throw(RuntimeError()))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: (set_to if set_to is not None else []).append(str(d)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)


def _cfg(device):
    return C.load(None, ["algorithm.name=cdsgd", f"run.device={device}"])


def test_cuda_missing_on_one_rank_is_the_same_error_everywhere(monkeypatch):
    _fake_gpus(monkeypatch, 0 if R == N - 1 else 1)     # the last rank has no GPU
    err = assert_raises_all(D.DeviceError, D.resolve_device, _cfg("cuda"), WORLD, match="device = \"cuda\"")
    msgs = WORLD.allgather(str(err))
    assert_all(len(set(msgs)) == 1, f"different messages {msgs}")
    if N > 1:
        assert_all(f"(1 of {N} ranks, first rank {N - 1})" in msgs[0], msgs[0])


def test_auto_uses_the_cpu_everywhere_unless_every_rank_has_a_gpu(monkeypatch, device_log):
    _fake_gpus(monkeypatch, 0 if R == N - 1 else 1)
    dev = D.resolve_device(_cfg("auto"), WORLD)
    assert_all(dev.type == "cpu", f"rank {R}: {dev}")
    if R == 0:
        assert_all(any("every rank uses the CPU" in m for _, m in device_log), str(device_log))
    else:
        assert_all(True)


def test_more_ranks_than_gpus_shares_with_a_warning(monkeypatch, device_log):
    set_to = []
    _fake_gpus(monkeypatch, 1, set_to)
    dev = D.resolve_device(_cfg("cuda"), WORLD)
    assert_all(str(dev) == "cuda:0" and set_to == ["cuda:0"], f"{dev} {set_to}")
    warn = [m for lvl, m in device_log if lvl == "WARNING"]
    if R == 0:
        host = socket.gethostname()
        lines = [m for _, m in device_log if m.startswith("device: rank ")]
        ok = lines == [f"device: rank {r} uses cuda:0 (GPU 0) on {host}" for r in range(N)]
        if N > 1:
            ranks = ", ".join(map(str, range(N)))
            ok = ok and len(warn) == 1 and f"ranks {ranks} share GPU 0 on {host}" in warn[0]
        else:
            ok = ok and warn == []
        assert_all(ok, str(device_log))
    else:
        assert_all(device_log == [], str(device_log))   # rank 0 speaks for the job


def test_one_gpu_per_rank_without_sharing(monkeypatch, device_log):
    set_to = []
    _fake_gpus(monkeypatch, N, set_to)
    monkeypatch.setenv("SLURM_LOCALID", str(N - 1 - R))   # Slurm numbers this node's tasks backwards
    dev = D.resolve_device(_cfg("cuda"), WORLD)
    assert_all(str(dev) == f"cuda:{N - 1 - R}", f"rank {R}: {dev}")
    assert_all(not any(lvl == "WARNING" for lvl, _ in device_log), str(device_log))
