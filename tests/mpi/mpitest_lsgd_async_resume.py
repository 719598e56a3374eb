"""Asynchronous LSGD / EASGD across a checkpoint (issue 24): the leader / centre windows' contents
(model and header [version, loss, owner, step]) are in the checkpoint, consistent with the workers'
saved states, and back in the window before any worker reads it; with ``deterministic = true``
two runs are bitwise equal, and so are an interrupted + resumed run and an uninterrupted one.
The kill -9 variant (a rank dies, the job is requeued) is tests/test_async_resume.py."""
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all
from mpidl import config
from mpidl.algorithms.lsgd import EASGD, LSGD
from mpidl.checkpoint import CheckpointStore
from mpidl.driver import train
from mpidl.h5state import read_tree

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 400
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
GS = 2 if N % 2 == 0 else 1             # multi-leader groups of 2 (or of 1 at odd sizes)

ALGOS = [pytest.param("lsgd", ["algorithm.tau_G=2", "algorithm.groups=size", f"algorithm.group_size={GS}",
                               "algorithm.tau=3", "algorithm.lr=0.1"], id="lsgd-multi"),
         pytest.param("easgd", ["algorithm.tau=2", "algorithm.lr=0.1"], id="easgd")]
STEPS, CKPT = 8, 4


def _base(tmp, name, run, extra):
    return (["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16", f'run.out="{tmp}"',
             "run.log_every=2", "run.eval_every=4", "data.eval_samples=100", f"algorithm.name={name}",
             "algorithm.asynchronous=true", f"run.steps={STEPS}", f"run.checkpoint_every={CKPT}",
             f"run.name={run}"] + extra)


def _fields(algo, state):
    """(label, window, host's model field, host's header field, world rank of the host) per window."""
    if isinstance(algo, EASGD):
        return [("center", algo.win_c, "c", "c_hdr", 0)]
    out = [("global", algo.win_g, "slot_g", "slot_hdr_g", 0)]
    if algo.win_l is not None:
        out.append(("local", algo.win_l, "slot_l", "slot_hdr_l", algo.lc.group_ranks[0]))
    return out


def _read_windows(algo, state):
    """Collective. What every rank reads through each window now (header zeros when empty)."""
    got = {}
    for label, win, _, _, host in _fields(algo, state):
        buf = np.empty_like(state.x)
        hdr = win.read(buf, charge=False)
        got[label] = (np.zeros(4) if hdr is None else np.array(hdr), buf, host)
    algo.lc.barrier()                   # nobody moves on (and writes) before everyone has read
    return got


def _spy(monkeypatch):
    """Record the windows as every rank reads them right after each checkpoint snapshot and
    right after the once-per-process restore (before the first local step)."""
    seen = {"ckpt": [], "restored": []}
    for cls in (LSGD, EASGD):
        prep, ensure = cls.prepare_checkpoint, cls._ensure_windows

        def prepare(self, state, mc, _prep=prep):
            out = _prep(self, state, mc)
            seen["ckpt"].append(_read_windows(self, state))
            return out

        def ensure_windows(self, state, _ensure=ensure):
            first = self._first
            _ensure(self, state)
            if first:
                seen["restored"].append(_read_windows(self, state))

        monkeypatch.setattr(cls, "prepare_checkpoint", prepare)
        monkeypatch.setattr(cls, "_ensure_windows", ensure_windows)
    return seen


def _algo_state(tmp, run, step, rank):
    """Local. The algorithm state that ``rank`` saved in checkpoint ``step`` of run ``run``."""
    folder = CheckpointStore(os.path.join(tmp, run, "checkpoints")).path(step)
    with h5py.File(os.path.join(folder, f"rank_{rank:05d}.h5"), "r") as f:
        return read_tree(f["state"])["algo"]


@pytest.mark.parametrize("name,extra", ALGOS)
def test_windows_are_checkpointed_and_restored_before_any_read(shared_tmp, monkeypatch, name, extra):
    base = _base(shared_tmp, name, "w", extra + [f"algorithm.slow_rank={N - 1}", "algorithm.slow_factor=3.0"])
    seen = _spy(monkeypatch)
    first = train(config.load(None, base), W, max_steps=CKPT)
    assert_all(first["step"] == CKPT and len(seen["ckpt"]) == 1, f"first leg {first}, {len(seen['ckpt'])} saves")
    at_ckpt = seen["ckpt"][0]
    mine = _algo_state(shared_tmp, "w", CKPT, R)
    for label, (hdr, x, host) in at_ckpt.items():
        saved = _algo_state(shared_tmp, "w", CKPT, host)
        key, hkey = {"global": ("slot_g", "slot_hdr_g"), "local": ("slot_l", "slot_hdr_l"),
                     "center": ("c", "c_hdr")}[label]
        # the host's checkpoint holds exactly what the window held when the checkpoint was taken
        assert_all(hdr[0] >= 1 and np.array_equal(saved[hkey], hdr) and np.array_equal(saved[key], x),
                   f"{label}: window {hdr} at the checkpoint, saved {saved[hkey]}; models equal: "
                   f"{np.array_equal(saved[key], x)}")
        if name == "lsgd":
            # consistent cut: the slot's owner saved the published model as its own leader copy
            owner = int(hdr[2])
            copy, lead = ("cg", "lead_g") if label == "global" else ("cl", "lead_l")
            ok = R != owner or (mine[lead] == owner and np.array_equal(mine[copy], x))
            assert_all(ok, f"{label} slot owned by {owner} (step {hdr[3]}) but its saved leader copy differs")
    second = train(config.load(None, base + ["run.resume=auto"]), W)
    assert_all(second["step"] == STEPS and second["stop"] == "done" and len(seen["restored"]) == 2,
               f"second leg {second}")
    restored = seen["restored"][1]          # [0]: the first leg's fresh start
    for label, (hdr, x, _) in at_ckpt.items():
        rh, rx, _ = restored[label]
        assert_all(np.array_equal(rh, hdr) and np.array_equal(rx, x),
                   f"{label} after resume: header {rh} (checkpointed {hdr}), models equal {np.array_equal(rx, x)}")
    col = "center_test_acc" if name == "easgd" else "leader_test_acc"
    assert_all(0.0 <= second[col] <= 1.0, f"{col}: {second.get(col)}")


def _equal_states(a, b):
    diff = sorted(k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k])))
    return set(a) == set(b) and not diff, diff


@pytest.mark.parametrize("name,extra", ALGOS)
def test_deterministic_runs_are_bitwise_equal_and_resume_exactly(shared_tmp, name, extra):
    base = _base(shared_tmp, name, "d", extra + ["algorithm.deterministic=true", "algorithm.round_steps=2"])
    col = "center_test_acc" if name == "easgd" else "leader_test_acc"
    plain = train(config.load(None, base), W)
    # a slowed worker changes the timing, not the result
    slowed = train(config.load(None, base + ["run.name=s", f"algorithm.slow_rank={N - 1}",
                                             "algorithm.slow_factor=3.0"]), W)
    part = train(config.load(None, base + ["run.name=i"]), W, max_steps=CKPT + 1)    # stops past the checkpoint
    assert_all(part["step"] == CKPT + 1, f"interrupted leg {part}")
    resumed = train(config.load(None, base + ["run.name=i", "run.resume=auto"]), W)
    assert_all(resumed["step"] == STEPS, f"resumed leg {resumed}")
    ref = _algo_state(shared_tmp, "d", STEPS, R)
    assert_all(ref["t"] == 2 * STEPS, f"{ref['t']} local steps, not round_steps x steps = {2 * STEPS}")
    for run, res in (("s", slowed), ("i", resumed)):
        same, diff = _equal_states(ref, _algo_state(shared_tmp, run, STEPS, R))
        metrics = [k for k in (col, "test_acc", "train_loss", "bytes_sent") if res[k] != plain[k]]
        assert_all(same and not metrics, f"run {run} differs from the plain deterministic run in {diff} "
                   f"and in {metrics}: {[(res[k], plain[k]) for k in metrics]}")
