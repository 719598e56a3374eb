"""LSGD and EASGD (sync, multi-leader, async) with device-resident state, under MPI (issue 23).

The device form of the model (``FlatModel(resident=True)``: parameters, gradients and every
array of the algorithm's state are torch tensors, the update runs as torch operations, the
code a GPU run executes, here on CPU tensors) trains bitwise like the NumPy form, through both
ways a device buffer reaches MPI:

* staged: ``mpidl.comm.core.STAGE_CPU_TENSORS`` sends every tensor through its host mirror,
  as a GPU tensor is without a CUDA-aware MPI (leader broadcasts, the EASGD sum, the RMA
  windows, the driver's control traffic);
* direct: ``cuda_aware`` forced on, the algorithm's collectives hand the tensors to MPI as
  they are (the RMA windows still stage: they live in host memory).

A run's checkpoint does not depend on the form: a resident run stopped half-way resumes in
the NumPy form bitwise equal to the straight NumPy run.  The asynchronous runs are
``deterministic = true`` (window accesses in rank order), so they are bitwise reproducible.
"""
import shutil
import tempfile

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpiutil import assert_all
from mpidl import config as C
from mpidl import flat
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import core, leader
from mpidl.driver import train

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 300
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
GS = 2 if N % 2 == 0 else 1             # multi-leader groups of 2 (or of 1 at odd sizes)
STEPS, CKPT = 20, 10

CASES = {
    "lsgd-sync": ["algorithm.name=lsgd", "algorithm.tau_G=3", "algorithm.window=4", "algorithm.lam_G=0.3",
                  "algorithm.momentum=0.5"],
    "lsgd-multi": ["algorithm.name=lsgd", "algorithm.groups=size", f"algorithm.group_size={GS}",
                   "algorithm.tau=2", "algorithm.tau_G=5", "algorithm.lam=0.2", "algorithm.weight_decay=1e-3"],
    "easgd-sync": ["algorithm.name=easgd", "algorithm.tau=2", "algorithm.momentum=0.5"],
    "easgd-async": ["algorithm.name=easgd", "algorithm.tau=2", "algorithm.asynchronous=true",
                    "algorithm.deterministic=true", "algorithm.round_steps=2"],
    "lsgd-async": ["algorithm.name=lsgd", "algorithm.groups=size", f"algorithm.group_size={GS}", "algorithm.tau=2",
                   "algorithm.tau_G=3", "algorithm.asynchronous=true", "algorithm.deterministic=true",
                   "algorithm.round_steps=2"],
}
SYNC = ("lsgd-sync", "lsgd-multi", "easgd-sync")


@pytest.fixture(scope="module")
def tmp():
    """A folder made by rank 0, the same path on every rank, for the whole module (the plain
    runs are shared by the tests)."""
    path = W.bcast(tempfile.mkdtemp(prefix="mpidl-resident-") if R == 0 else None)
    yield path
    W.Barrier()
    if R == 0:
        shutil.rmtree(path, ignore_errors=True)


def _cfg(tmp, case, run, *extra):
    return C.load(None, ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16", f'run.out="{tmp}"',
                         "run.log_every=5", "run.eval_every=10", "data.eval_samples=100", f"run.steps={STEPS}",
                         f"run.checkpoint_every={CKPT}", f"run.name={case}-{run}"] + CASES[case] + list(extra))


def _algo(tmp, case, run, gc, step=STEPS):
    state, _ = CheckpointStore(f"{tmp}/{case}-{run}/checkpoints", gc).load(step)
    return state["algo"]


def _diff(a, b, path=""):
    """Local. The paths where the two saved trees differ (arrays: dtype, shape or any bit)."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(set(a) ^ set(b))}"]
        return [d for k in sorted(a) for d in _diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        ok = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        return [] if ok else [path]
    return [] if a == b else [path]


_PLAIN = {}


def _plain(tmp, case):
    """Collective. The NumPy run of ``case`` (trained once per module)."""
    if case not in _PLAIN:
        _PLAIN[case] = train(_cfg(tmp, case, "plain"), W)
    return _PLAIN[case]


class _Resident(flat.FlatModel):
    made = []

    def __init__(self, model, dtype=torch.float32, device=None, resident=None):
        super().__init__(model, dtype, device, resident=True)
        _Resident.made.append(self)


def _resident(monkeypatch, direct):
    """Resident models, every tensor staged through a host mirror; ``direct``: a CUDA-aware MPI
    (the algorithm's collectives take the tensors as they are).  Returns the direct-path counter."""
    _Resident.made = []
    monkeypatch.setattr(flat, "FlatModel", _Resident)
    monkeypatch.setattr(core, "STAGE_CPU_TENSORS", True)
    calls = {"direct": 0, "staged": 0}
    real_direct, real_as_array = leader._device_buffer, leader._as_array

    def device_buffer(x):
        calls["direct"] += 1
        return real_direct(x)

    def as_array(x, *a, **kw):
        calls["staged"] += torch.is_tensor(x)
        return real_as_array(x, *a, **kw)
    monkeypatch.setattr(leader, "_device_buffer", device_buffer)
    monkeypatch.setattr(leader, "_as_array", as_array)
    if direct:
        monkeypatch.setattr("mpidl.driver.resolve_cuda_aware", lambda cfg, world, device: True)
    return calls


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["staged", "direct"])
def test_resident_run_is_bitwise_the_numpy_run(tmp, gc, monkeypatch, case, mode):
    plain = _plain(tmp, case)
    calls = _resident(monkeypatch, mode == "direct")
    res = train(_cfg(tmp, case, mode), W)
    monkeypatch.undo()
    assert_all(len(_Resident.made) == 2 and all(torch.is_tensor(m.x) for m in _Resident.made),
               f"resident models: {len(_Resident.made)}")
    # the leader communicator went the way the mode says (sync: bcast / allreduce_sum on tensors;
    # async: the windows stage the tensors)
    if mode == "direct" and case in SYNC:
        assert_all(calls["direct"] > 0, f"{case}: no tensor took the direct path {calls}")
    else:
        assert_all(calls["direct"] == 0 and calls["staged"] > 0, f"{case} {mode}: {calls}")
    diff = _diff(_algo(tmp, case, "plain", gc), _algo(tmp, case, mode, gc))
    metrics = [k for k in ("test_acc", "train_loss", "bytes_sent") if res[k] != plain[k]]
    assert_all(not diff and not metrics, f"{case} {mode}: state differs in {diff}, metrics in "
               f"{[(k, res[k], plain[k]) for k in metrics]}")


@pytest.mark.parametrize("case", list(CASES))
def test_resident_checkpoint_resumes_in_numpy_form(tmp, gc, monkeypatch, case):
    """Stopped at step 10 in the resident form (direct path), resumed in the NumPy form: bitwise
    the straight NumPy run."""
    _plain(tmp, case)
    _resident(monkeypatch, direct=True)
    first = train(_cfg(tmp, case, "resumed"), W, max_steps=CKPT)
    monkeypatch.undo()
    assert_all(first["step"] == CKPT, f"first leg {first}")
    second = train(_cfg(tmp, case, "resumed", "run.resume=auto"), W)
    assert_all(second["step"] == STEPS, f"second leg {second}")
    diff = _diff(_algo(tmp, case, "plain", gc), _algo(tmp, case, "resumed", gc))
    assert_all(not diff, f"{case}: resumed state differs from the straight run in {diff}")
