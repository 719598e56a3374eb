"""The device path on the CPU: bitwise equality and checkpoint portability.

* ``run.device = "cpu"`` (and ``auto`` on a machine without CUDA) gives bitwise the run
  without the key;
* the device-resident path (FlatModel(resident=True): the parameter and gradient buffers,
  and so every array of the algorithm's state, are torch tensors and the updates run as
  torch operations, exactly the code a GPU run executes, here on CPU tensors) gives bitwise
  the NumPy run, for the agent layout (every family) and the fdg grid; so the GPU path
  differs from the CPU path only by where torch computes;
* a checkpoint carrying CUDA RNG states (as a GPU run writes) resumes on the CPU with one
  warning, bitwise equal to the straight run.
"""
import logging

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpidl import checkpoint as ck
from mpidl import config as C
from mpidl import flat
from mpidl.algorithms import fdg_grid
from mpidl.checkpoint import CheckpointStore
from mpidl.driver import train
from test_device import _Catch
from test_fdg_units import _cfg as _fdg_cfg
from test_fdg_units import _grid, _one_model_at_a_time, _steps  # noqa: F401 (autouse fixture)

WORLD = MPI.COMM_WORLD
HAVE_CUDA = torch.cuda.is_available()


def _cfg(out, name, algo, *extra):
    return C.load(None, ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16", f'run.out="{out}"',
                         "run.log_every=5", "run.eval_every=10", "data.eval_samples=100",
                         f"algorithm.name={algo}", "run.steps=20", "run.checkpoint_every=10",
                         f"run.name={name}"] + list(extra))


def _final(out, name, step=20):
    state, _ = CheckpointStore(out / name / "checkpoints").load(step)
    return state


def _same_tree(a, b, path=""):
    a, b = (v.detach().numpy() if torch.is_tensor(v) else v for v in (a, b))
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    else:
        assert a == b, path


class _Resident(flat.FlatModel):
    made = []

    def __init__(self, model, dtype=torch.float32, device=None, resident=None):
        super().__init__(model, dtype, device, resident=True)
        assert isinstance(self.x, torch.Tensor) and isinstance(self.g, torch.Tensor)
        _Resident.made.append(self)


@pytest.mark.parametrize("algo,extra", [
    ("cdsgd", []), ("cdsgd", ["algorithm.form=atc"]), ("cdmsgd", []), ("cdmsgd", ["algorithm.momentum_form=heavy-ball"]),
    ("centralized", ["algorithm.momentum=0.9", "algorithm.nesterov=true", "algorithm.weight_decay=1e-3"]),
    ("fedavg", ["algorithm.local_steps=3"]), ("easgd", ["algorithm.momentum=0.5"]),
    ("lsgd", ["algorithm.momentum=0.5", "algorithm.tau_G=3"])])
def test_cpu_key_auto_and_resident_are_bitwise_the_plain_run(tmp_path, monkeypatch, algo, extra):
    plain = train(_cfg(tmp_path, "plain", algo, *extra), WORLD)
    cpu = train(_cfg(tmp_path, "cpu", algo, "run.device=cpu", *extra), WORLD)
    runs = {"cpu": cpu}
    if not HAVE_CUDA:
        runs["auto"] = train(_cfg(tmp_path, "auto", algo, "run.device=auto", *extra), WORLD)
    _Resident.made = []
    monkeypatch.setattr(flat, "FlatModel", _Resident)
    runs["resident"] = train(_cfg(tmp_path, "resident", algo, *extra), WORLD)
    assert len(_Resident.made) == 2                     # the training and the evaluation model
    want = _final(tmp_path, "plain")
    for name, res in runs.items():
        _same_tree(want["algo"], _final(tmp_path, name)["algo"])
        assert res["test_acc"] == plain["test_acc"] and res["train_loss"] == plain["train_loss"], name


@pytest.mark.parametrize("M,K", [(2, 2), (1, 3)])
def test_fdg_resident_is_bitwise_the_plain_grid(monkeypatch, M, K):
    """Stage weights, momentum, stashes and message buffers as torch tensors (the device form):
    bitwise the NumPy grid."""
    cfg = _fdg_cfg(M, K, "algorithm.lr=0.1", f"algorithm.cuts={list(range(1, K))}", "run.steps=9",
                   "algorithm.momentum=0.9")

    def work(sess):
        sess, state = _steps(9)(sess)
        return sess.evaluate(state)[0], {k: (v.clone() if torch.is_tensor(v) else np.copy(v)) for k, v in vars(state).items()}
    plain = _grid(cfg, M, K, work)
    monkeypatch.setattr(fdg_grid, "FlatModel", _Resident)
    resident = _grid(cfg, M, K, work)
    for key in plain:
        assert plain[key][0] == resident[key][0], key
        _same_tree(plain[key][1], resident[key][1])


# -- checkpoint portability ------------------------------------------------------------------
@pytest.fixture
def ckpt_log():
    h = _Catch()
    lg = logging.getLogger("mpidl.checkpoint")
    lg.addHandler(h)
    yield h.lines
    lg.removeHandler(h)


def _fake_gpu_rng(real):
    def rng_state(generator=None):
        st = real(generator)
        st["torch_cuda"] = {"1": np.arange(16, dtype=np.uint8)}      # as rank on cuda:1 would write
        return st
    return rng_state


@pytest.mark.skipif(HAVE_CUDA, reason="checks the CPU side of a GPU checkpoint")
def test_rng_state_with_cuda_entries_restores_the_cpu_rngs_and_warns(tmp_path, ckpt_log):
    np.random.seed(3)
    torch.manual_seed(4)
    st = ck.rng_state()
    st["torch_cuda"] = {"0": np.arange(16, dtype=np.uint8)}
    store = CheckpointStore(tmp_path)
    store.save(1, {"rng": st})
    want = (np.random.random(3), torch.rand(3))
    np.random.seed(0)
    torch.manual_seed(0)
    got, _ = store.load(1, like={"rng": None})
    assert set(got["rng"]["torch_cuda"]) == {"0"}
    ck.set_rng_state(got["rng"])
    again = (np.random.random(3), torch.rand(3))
    assert np.array_equal(want[0], again[0]) and torch.equal(want[1], again[1])
    warn = [m for lvl, m in ckpt_log if lvl == "WARNING"]
    assert len(warn) == 1 and "CUDA RNG" in warn[0] and "no CUDA device" in warn[0], ckpt_log


def test_a_cpu_process_writes_no_cuda_rng_state():
    assert HAVE_CUDA or "torch_cuda" not in ck.rng_state()


def test_bad_torch_rng_state_is_a_checkpoint_error():
    st = ck.rng_state()
    st["torch"] = st["torch"][:-1]
    with pytest.raises(ck.CheckpointError, match="torch RNG state has shape"):
        ck.set_rng_state(st)


@pytest.mark.skipif(HAVE_CUDA, reason="checks the CPU side of a GPU checkpoint")
def test_gpu_written_checkpoint_resumes_on_the_cpu(tmp_path, monkeypatch, ckpt_log):
    """The first leg's checkpoint carries a CUDA RNG entry (the GPU run's format); the CPU resume
    warns once and ends bitwise equal to the straight run."""
    extra = ["model.dropout=0.2"]          # draws from torch's CPU RNG: the resume must restore it
    train(_cfg(tmp_path, "straight", "cdmsgd", *extra), WORLD)
    monkeypatch.setattr("mpidl.driver.rng_state", _fake_gpu_rng(ck.rng_state))
    first = train(_cfg(tmp_path, "resumed", "cdmsgd", *extra), WORLD, max_steps=10)
    assert first["step"] == 10
    monkeypatch.undo()
    assert "torch_cuda" in _final(tmp_path, "resumed", 10)["rng"]
    second = train(_cfg(tmp_path, "resumed", "cdmsgd", "run.resume=auto", *extra), WORLD)
    assert second["step"] == 20
    _same_tree(_final(tmp_path, "straight")["algo"], _final(tmp_path, "resumed")["algo"])
    warn = [m for lvl, m in ckpt_log if lvl == "WARNING"]
    assert len(warn) == 1 and "device(s) 1" in warn[0], ckpt_log


# -- the worked example of docs/clusters.md#gpus -------------------------------------------------
def test_docs_gpu_example(tmp_path):
    """The documented command, at 2 ranks: on this machine `auto` falls back to the CPU and says so;
    a short run (3 steps, a small evaluation) that writes its results file."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from test_mpi_suite import mpiexec
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "clusters.md").read_text()
    cmds = re.findall(r"^mpiexec -n 2 python -m mpidl run (jobs/configs/cdmsgd_resnet20_gpu\.toml.*)$", doc, re.M)
    assert len(cmds) == 1, cmds
    args = cmds[0].split() + ["--set", "run.steps=3", "--set", "data.eval_samples=64", "--set", "run.log_every=1",
                              "--set", f'run.out="{tmp_path}"']
    proc = subprocess.run([*mpiexec(), "-n", "2", sys.executable, "-m", "mpidl", "run", *args], cwd=root,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    if not HAVE_CUDA:
        assert "every rank uses the CPU" in log, log[-2000:]
    else:
        assert "device: rank 1 uses cuda:" in log and "comm: " in log, log[-2000:]
    assert (tmp_path / "gpu_try" / "results.h5").is_file()
