"""The fdg M x K grid with device-resident stage state under mpiexec, on CPU tensors.

Each stage's FlatModel is forced resident, so its weights, momentum, stashes, message buffers
and gradients are torch tensors and the update runs as torch operations (the code a GPU run
executes).  Whole driver runs (grids K = 2 and K = world size), each against the NumPy run,
bitwise (final checkpointed state and metrics):

* staged: the messages and the stage allreduce go through host mirrors (``STAGE_CPU_TENSORS``:
  the copies a GPU run makes without a CUDA-aware MPI);
* direct: tensors handed to MPI as they are (``cuda_aware`` forced);

and a resident run stopped halfway, resumed by a NumPy run, equals the straight NumPy run.
"""
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpiutil import assert_all
from mpidl import config
from mpidl import driver as drv
from mpidl import topology as T
from mpidl.algorithms import fdg_grid
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm, core
from mpidl.comm import grid as gridmod
from mpidl.flat import FlatModel

MPI_SIZES = (2, 3, 4)
MPI_TIMEOUT = 300
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
GRIDS = sorted({(N // 2, 2), (1, N)} if N % 2 == 0 else {(1, N)})   # (M, K): K = 2 (even N) and K = N
torch.set_num_threads(1)


class _Resident(FlatModel):
    made = []

    def __init__(self, model, dtype=torch.float32, device=None, resident=None):
        super().__init__(model, dtype, device, resident=True)
        _Resident.made.append(self)


def _cfg(out, name, M, K, *extra):
    return config.load(None, [
        "data.dataset=digits", "model.hidden=[12, 10, 8]", "run.batch_size=16", 'model.dtype="float32"',
        f'run.out="{out}"', f"run.name={name}", "run.log_every=3", "run.eval_every=6", "data.eval_samples=100",
        "run.steps=12", "run.checkpoint_every=6", "algorithm.name=fdg", f"algorithm.stages={K}",
        f"algorithm.replicas={M}", f"algorithm.cuts={list(range(1, K))}", "algorithm.lr=0.1",
        "algorithm.momentum=0.9", "algorithm.beta=0.5", "algorithm.weight_decay=0.001"] + list(extra))


def _algo_state(out, name, step=12):
    with GraphComm(W, T.complete(N)) as gc:
        state, _ = CheckpointStore(f"{out}/{name}/checkpoints", gc).load(step)
    return state["algo"]


def _same(a, b):
    return set(a) == set(b) and all(np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
                                    and np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


KEYS = ("test_acc", "test_loss", "train_loss", "train_acc", "bytes_sent", "step")


def _eq(a, b):
    """Equal, NaN included (a drained pipeline's last training window has no loss)."""
    return a == b or (a != a and b != b)


def _resident(mp, mode):
    """Force resident stages; ``mode`` staged (host mirrors) or direct (cuda_aware). Returns a call counter."""
    _Resident.made = []
    mp.setattr(fdg_grid, "FlatModel", _Resident)
    calls = {"direct": 0}
    if mode == "staged":
        mp.setattr(core, "STAGE_CPU_TENSORS", True)
        mp.setattr(core, "_STAGES", OrderedDict())      # only this run's mirrors
    else:
        mp.setattr(drv, "resolve_cuda_aware", lambda cfg, world, device: True)
        real = gridmod._device_buffer

        def counted(x):
            calls["direct"] += 1
            return real(x)
        mp.setattr(gridmod, "_device_buffer", counted)
    return calls


@pytest.mark.parametrize("mode", ["staged", "direct"])
@pytest.mark.parametrize("M,K", GRIDS)
def test_resident_grid_equals_numpy_bitwise(shared_tmp, monkeypatch, M, K, mode):
    plain = drv.train(_cfg(shared_tmp, "plain", M, K), W)
    with monkeypatch.context() as mp:
        calls = _resident(mp, mode)
        res = drv.train(_cfg(shared_tmp, "res", M, K), W)
        staged = len(core._STAGES)
    fms = _Resident.made
    assert_all(len(fms) == 1 and torch.is_tensor(fms[0].x) and fms[0].resident, f"{mode}: stage not resident")
    if mode == "staged":
        assert_all(staged > 0, "no message went through a host mirror")
    else:
        assert_all(calls["direct"] > 0, "no message went to MPI directly")
    assert_all(_same(_algo_state(shared_tmp, "plain"), _algo_state(shared_tmp, "res")),
               f"{M}x{K} {mode}: final state differs")
    assert_all(_same(_algo_state(shared_tmp, "plain", 6), _algo_state(shared_tmp, "res", 6)),
               f"{M}x{K} {mode}: state at step 6 differs")
    assert_all(all(_eq(plain[k], res[k]) for k in KEYS),
               f"{M}x{K} {mode}: metrics {[(k, plain[k], res[k]) for k in KEYS]}")


@pytest.mark.parametrize("mode", ["staged", "direct"])
def test_resident_checkpoint_resumes_in_a_numpy_run_bitwise(shared_tmp, monkeypatch, mode):
    M, K = (N // 2, 2) if N % 2 == 0 else (1, N)
    straight = drv.train(_cfg(shared_tmp, "straight", M, K), W)
    with monkeypatch.context() as mp:
        _resident(mp, mode)
        first = drv.train(_cfg(shared_tmp, "split", M, K), W, max_steps=6)
    second = drv.train(_cfg(shared_tmp, "split", M, K, "run.resume=auto"), W)
    assert_all(first["step"] == 6 and second["step"] == 12, f"steps {first['step']}, {second['step']}")
    assert_all(_same(_algo_state(shared_tmp, "straight"), _algo_state(shared_tmp, "split")), "resumed state")
    assert_all(all(_eq(straight[k], second[k]) for k in ("test_acc", "test_loss", "train_loss", "bytes_sent")),
               f"metrics {[(k, straight[k], second[k]) for k in ('test_acc', 'test_loss', 'train_loss')]}")
