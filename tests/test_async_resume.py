"""kill -9 of a rank of a 4-rank asynchronous LSGD / EASGD run after a checkpoint, then resume
(issue 24): the leader / centre windows right after the resume hold exactly what the checkpoint
saved (what the killed job's windows held), the resumed run ends with an accuracy within the
seed spread of uninterrupted runs, and with ``deterministic = true`` the interrupted + resumed
run equals the uninterrupted one bitwise.  Runs tests/mpi/mpidl_async_job.py (the driver, as
``python -m mpidl run`` does) under mpiexec, like a user's job."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpidl.checkpoint import CheckpointStore
from mpidl.h5state import read_tree
from test_crash_resume import rank_pid
from test_mpi_suite import mpiexec

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "mpi" / "mpidl_async_job.py"
NP, CKPT, END, SEEDS = 4, 10, 40, (0, 1, 2)
ALGOS = {"lsgd": ["algorithm.tau_G=2", "algorithm.groups=size", "algorithm.group_size=2", "algorithm.tau=3"],
         "easgd": ["algorithm.tau=2"]}
ACC = {"lsgd": "leader_test_acc", "easgd": "center_test_acc"}
SLOT = {"global": ("slot_g", "slot_hdr_g"), "local": ("slot_l", "slot_hdr_l"), "center": ("c", "c_hdr")}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the rank processes")]


def _sets(out, name, run, steps, extra=()):
    return ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=32", "algorithm.lr=0.1",
            f'run.out="{out}"', f"run.name={run}", f"run.steps={steps}", f"run.checkpoint_every={CKPT}",
            f"run.log_every={CKPT}", f"run.eval_every={CKPT}", "run.resume=auto", f"algorithm.name={name}",
            "algorithm.asynchronous=true", f"algorithm.slow_rank={NP - 1}", "algorithm.slow_factor=2.0",
            *ALGOS[name], *extra]


def _start(out, sets):
    dump = Path(out) / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([*mpiexec(), "-n", str(NP), sys.executable, str(JOB), str(dump), *sets],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run(out, sets):
    """Run to the end; the final metrics and what every rank read in the windows right after the start."""
    proc = _start(out, sets)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, (stdout[-3000:], stderr[-3000:])
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, stdout[-3000:]
    dumps = [dict(np.load(Path(out) / "dump" / f"restored_{r}.npz")) for r in range(NP)]
    return json.loads(line[-1][7:]), dumps


def _kill_after_checkpoint(out, sets, victim=0):
    """Start an unbounded run, kill -9 rank ``victim`` once checkpoint 2 CKPT is complete; the checkpoint step."""
    proc = _start(out, sets)
    ckpts = Path(out) / sets[5].split("=", 1)[1] / "checkpoints"
    t0 = time.monotonic()
    try:
        while not (ckpts / f"step_{2 * CKPT:08d}" / "manifest.json").exists():
            if proc.poll() is not None:
                pytest.fail(f"run ended early: {proc.communicate()[1][-3000:]}")
            if time.monotonic() - t0 > 240:
                pytest.fail("no checkpoint after 240 s")
            time.sleep(0.02)
        pid = rank_pid(victim, under=proc.pid)
        assert pid is not None, f"rank {victim} not found"
        os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0, "the job survived the kill"
    step = CheckpointStore(ckpts).latest()
    assert step is not None and step >= 2 * CKPT, step
    assert step < END, f"the killed run got to checkpoint {step} >= {END} before the kill: raise END"
    return step


def _algo(out, run, step, rank):
    folder = CheckpointStore(Path(out) / run / "checkpoints").path(step)
    with h5py.File(Path(folder) / f"rank_{rank:05d}.h5", "r") as f:
        return read_tree(f["state"])["algo"]


def _hosts(name):
    """World rank of each window's host per rank: {label: host} (groups of 2 for LSGD)."""
    if name == "easgd":
        return [{"center": 0} for _ in range(NP)]
    return [{"global": 0, "local": r - r % 2} for r in range(NP)]


def _check_restored(out, run, step, name, dumps):
    """Every rank read, right after the resume, exactly the window contents of checkpoint ``step``."""
    for r, hosts in enumerate(_hosts(name)):
        for label, host in hosts.items():
            key, hkey = SLOT[label]
            saved = _algo(out, run, step, host)
            hdr, x = dumps[r][f"{label}_hdr"], dumps[r][f"{label}_x"]
            assert saved[hkey][0] >= 1, f"{label}: the checkpoint holds an empty window {saved[hkey]}"
            assert np.array_equal(hdr, saved[hkey]), (r, label, hdr, saved[hkey])
            assert np.array_equal(x, saved[key]), (r, label, "model differs from the checkpointed one")


@pytest.mark.parametrize("name", list(ALGOS))
def test_kill9_async_run_resumes_with_its_windows(tmp_path, name):
    step = _kill_after_checkpoint(tmp_path, _sets(tmp_path, name, "killed", 100000))
    resumed, dumps = _run(tmp_path, _sets(tmp_path, name, "killed", END))
    assert resumed["step"] == END and resumed["stop"] == "done", resumed
    _check_restored(tmp_path, "killed", step, name, dumps)
    # the uninterrupted runs, one per seed (the resumed run used seed 0)
    accs = [_run(tmp_path, _sets(tmp_path, name, f"seed{s}", END, [f"run.seed={s}"]))[0][ACC[name]] for s in SEEDS]
    lo, hi = min(accs), max(accs)
    spread = hi - lo
    acc = resumed[ACC[name]]
    print(f"{name}: resumed from {step}, {ACC[name]} {acc:.4f}; uninterrupted seeds {accs}")
    assert lo - spread <= acc <= hi + spread, (
        f"{name}: {ACC[name]} {acc:.4f} after kill -9 and resume, uninterrupted runs {accs} (spread {spread:.4f})")


@pytest.mark.parametrize("name", list(ALGOS))
def test_kill9_deterministic_async_run_resumes_bitwise(tmp_path, name):
    det = ["algorithm.deterministic=true"]
    straight, _ = _run(tmp_path, _sets(tmp_path, name, "straight", END, det))
    step = _kill_after_checkpoint(tmp_path, _sets(tmp_path, name, "killed", 100000, det))
    resumed, dumps = _run(tmp_path, _sets(tmp_path, name, "killed", END, det))
    _check_restored(tmp_path, "killed", step, name, dumps)
    for r in range(NP):
        a, b = _algo(tmp_path, "straight", END, r), _algo(tmp_path, "killed", END, r)
        diff = sorted(k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k])))
        assert set(a) == set(b) and not diff, f"rank {r}: resumed state differs from the straight run in {diff}"
    for key in (ACC[name], "test_acc", "test_loss", "train_loss"):
        assert resumed[key] == straight[key], (key, resumed[key], straight[key])
