"""Cluster checks under a real Slurm (issue 10); run by ``bash scripts/test-cluster.sh``.

Not collected by the default ``python -m pytest`` (the file name does not match
``test_*.py``).  Needs ``SLURM_CONF`` of a running Slurm (scripts/cluster/slurm.sh)
whose ``MpiDefault`` is ``none``, this Python's mpi4py over MPICH (the README's
set-up) and, for the cross-MPI checks, ``MPIDL_OMPI_PYTHON``: a Python whose
mpi4py was built against Open MPI.

Checks: an sbatch job trains; a job sent ``--signal=B:USR1@40`` before its time
limit saves, requeues, resumes and ends with exactly the rows of an uninterrupted
run; kill -9 of rank 0 under srun, then a resubmitted job keeps every row up to
the last checkpoint and continues the wall time; the singleton-world error under
srun without ``--mpi`` and under another MPI's mpiexec (both directions).
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpidl.checkpoint import CheckpointStore
from mpidl.metrics import load_results
from test_crash_resume import check_resumed, check_rows_up_to, rank_pid

ROOT = Path(__file__).resolve().parents[2]
TINY = "tests/cluster/tiny.toml"
LOG, EVAL, CKPT = 10, 50, 50                     # tiny.toml's cadence
BIN = str(Path(sys.executable).parent)
OMPI_PY = os.environ.get("MPIDL_OMPI_PYTHON", "")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not os.environ.get("SLURM_CONF") or not shutil.which("sbatch"):
        pytest.fail("no Slurm: run these checks through scripts/test-cluster.sh")
    p = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "idle" in p.stdout, p.stdout + p.stderr


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    env.update(extra)
    return env


def _sbatch(*args, env=None):
    p = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", *map(str, args)], env=env or _env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _job(jid):
    p = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return dict(tok.split("=", 1) for tok in p.stdout.split() if "=" in tok)


def _wait(jid, timeout, on_poll=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        info = _job(jid)
        if info["JobState"] in TERMINAL:
            return info
        if on_poll is not None:
            on_poll(info)
        time.sleep(1)
    subprocess.run(["scancel", jid], timeout=30)
    pytest.fail(f"job {jid} not finished after {timeout} s: {_job(jid)}")


def _errors(text):
    return [ln for ln in text.splitlines() if "mpidl run: error:" in ln]


def _mpiexec_run(out, name, steps):
    """The uninterrupted reference, under the MPICH wheel's mpiexec."""
    p = subprocess.run([str(Path(BIN) / "mpiexec"), "-n", "2", sys.executable, "-m", "mpidl", "run", TINY,
                        "--set", f'run.out="{out}"', "--set", f'run.name="{name}"', "--set", f"run.steps={steps}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return load_results(Path(out) / name / "results.h5")


def test_sbatch_job_trains(tmp_path):
    jid = _sbatch("--nodes=1", "--ntasks-per-node=2", "--time=10", f"--output={tmp_path}/job.out",
                  f"--export=ALL,CONFIG={TINY}", "jobs/cdsgd.sbatch",
                  "--set", f'run.out="{tmp_path}"', "--set", "run.steps=100")
    info = _wait(jid, 600)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "ring(2)" in log and "finished (done) at step 100/100" in log, log[-3000:]
    d = load_results(tmp_path / "tiny" / "results.h5")
    assert int(d["attrs"]["world_size"]) == 2
    assert d["series"]["train"]["step"].tolist() == list(range(LOG, 101, LOG))


def test_signalled_job_saves_requeues_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """--time=1 --signal=B:USR1@40: Slurm signals the batch shell 20..50 s after the start (its
    time-limit checks run every 30 s); the job script forwards the signal, the ranks save at the
    same step, the script requeues the job.  The harness then lifts the time limit and the
    requeue delay of the pending job, so it resumes once and runs to the end."""
    cal = _mpiexec_run(tmp_path / "cal", "cal", 300)["series"]["train"]     # steps/s on this machine now
    rate = (cal["step"][-1] - cal["step"][0]) / max(1e-3, cal["wall_time"][-1] - cal["wall_time"][0])
    steps = int(min(40000, max(1000, math.ceil(rate * 60 / CKPT) * CKPT)))  # ~60 s of training
    jid = _sbatch("--nodes=1", "--ntasks-per-node=2", "--time=1", "--signal=B:USR1@40",
                  f"--output={tmp_path}/job.out", f"--export=ALL,CONFIG={TINY}", "jobs/cdsgd.sbatch",
                  "--set", f'run.out="{tmp_path}"', "--set", f"run.steps={steps}")
    lifted = []

    def lift(info):
        if info["JobState"] == "PENDING" and int(info.get("Restarts", 0)) >= 1 and not lifted:
            p = subprocess.run(["scontrol", "update", f"JobId={jid}", "TimeLimit=30", "StartTime=now"],
                               capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, p.stderr
            lifted.append(time.monotonic())

    reference = _mpiexec_run(tmp_path / "ref", "tiny", steps)  # runs while the job does: that only slows it
    info = _wait(jid, 1500, lift)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert int(info["Restarts"]) == 1, (info["Restarts"], log[-4000:])
    assert "preemption requested (SIGUSR1)" in log and "resumed from" in log, log[-4000:]
    assert f"finished (done) at step {steps}/{steps}" in log, log[-3000:]
    got = load_results(tmp_path / "tiny" / "results.h5")
    resumed = [r["step"] for r in json.loads(got["attrs"]["resumes"])]
    assert len(resumed) == 1, resumed
    # Every train and eval row equals the uninterrupted run's, the byte counter included (the
    # checkpoint carries the driver's open averaging window and byte offset).
    for name in ("train", "eval"):
        a, b = got["series"][name], reference["series"][name]
        assert a["step"].tolist() == b["step"].tolist(), name
        for col in b:
            if "wall" in col or "time" in col:
                continue  # measurements of this invocation, not results
            assert np.array_equal(a[col], b[col], equal_nan=True), (name, col)


def test_kill9_of_a_rank_under_srun_then_resubmit_keeps_rows(tmp_path):
    args = ("--nodes=1", "--ntasks-per-node=2", "--time=10", f"--export=ALL,CONFIG={TINY}", "jobs/cdsgd.sbatch",
            "--set", f'run.out="{tmp_path}"')
    jid = _sbatch(f"--output={tmp_path}/job1.out", *args, "--set", "run.steps=100000")
    ckpts = tmp_path / "tiny" / "checkpoints"
    t0 = time.monotonic()
    while not (ckpts / f"step_{2 * CKPT:08d}" / "manifest.json").exists():
        assert _job(jid)["JobState"] in ("PENDING", "RUNNING"), (tmp_path / "job1.out").read_text()[-3000:]
        assert time.monotonic() - t0 < 300, "no checkpoint after 300 s"
        time.sleep(0.05)
    victim = rank_pid(0, SLURM_JOB_ID=jid)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    info = _wait(jid, 300)
    assert info["JobState"] == "FAILED", info
    c = CheckpointStore(ckpts).latest()
    res = tmp_path / "tiny" / "results.h5"
    wall_c = check_rows_up_to(load_results(res), c, LOG, EVAL, CKPT)
    end = c + 2 * LOG
    jid = _sbatch(f"--output={tmp_path}/job2.out", *args, "--set", f"run.steps={end}")
    info = _wait(jid, 600)
    assert info["JobState"] == "COMPLETED", (tmp_path / "job2.out").read_text()[-3000:]
    check_resumed(load_results(res), res, c, end, wall_c, LOG, EVAL)


def _one_line_error(proc, *needles):
    text = proc.stdout + proc.stderr
    lines = _errors(text)
    assert proc.returncode == 2, (proc.returncode, text[-3000:])
    assert len(lines) == 1, text[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in text
    return lines[0]


def test_srun_without_mpi_plugin_is_one_line_error(tmp_path):
    p = subprocess.run(["srun", "-n", "2", "--mpi=none", sys.executable, "-m", "mpidl", "run", TINY,
                        "--set", f'run.out="{tmp_path}"'], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    _one_line_error(p, "srun started 2 tasks", "srun --mpi=pmi2")
    assert not (tmp_path / "tiny").exists()  # nothing written


def test_sbatch_with_site_default_mpi_none_is_one_line_error(tmp_path):
    jid = _sbatch("--nodes=1", "--ntasks-per-node=2", "--time=5", f"--output={tmp_path}/job.out",
                  f"--export=ALL,CONFIG={TINY},MPIDL_SRUN_MPI=", "jobs/cdsgd.sbatch",
                  "--set", f'run.out="{tmp_path}"', env=_env())
    info = _wait(jid, 300)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), (info, log)
    assert len(_errors(log)) == 1 and "--mpi=pmi2" in _errors(log)[0], log
    assert not (tmp_path / "tiny").exists()


def _need_ompi():
    if not OMPI_PY or not Path(OMPI_PY).exists():
        pytest.fail("MPIDL_OMPI_PYTHON (a Python with mpi4py over Open MPI) is not set")
    return OMPI_PY


def _ompi_env():
    return _env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def test_open_mpi_mpiexec_running_mpich_mpi4py_is_one_line_error(tmp_path):
    p = subprocess.run(["mpiexec.openmpi", "--oversubscribe", "-n", "2", sys.executable, "-m", "mpidl", "run",
                        TINY, "--set", f'run.out="{tmp_path}"'], cwd=ROOT, env=_ompi_env(), capture_output=True,
                       text=True, timeout=300)
    _one_line_error(p, "Open MPI's mpiexec started 2 tasks", "MPICH", str(Path(BIN) / "mpiexec"))
    assert not (tmp_path / "tiny").exists()


def test_mpich_mpiexec_running_open_mpi_mpi4py_is_one_line_error(tmp_path):
    py = _need_ompi()
    p = subprocess.run([str(Path(BIN) / "mpiexec"), "-n", "2", py, "-m", "mpidl", "run", TINY,
                        "--set", f'run.out="{tmp_path}"'], cwd=ROOT, env=_ompi_env(), capture_output=True,
                       text=True, timeout=300)
    _one_line_error(p, "started 2 tasks", "Open MPI", "mpiexec.openmpi")
    assert not (tmp_path / "tiny").exists()


def test_open_mpi_under_srun_pmix(tmp_path):
    """Open MPI's mpi4py: srun --mpi=pmix gives one world of 2; without it, the error names pmix."""
    py = _need_ompi()
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; print('world', c.Get_rank(), c.Get_size())"
    p = subprocess.run(["srun", "-n", "2", "--mpi=pmix", py, "-c", code], env=_ompi_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and sorted(p.stdout.split("\n"))[-2:] == ["world 0 2", "world 1 2"], \
        p.stdout + p.stderr[-2000:]
    p = subprocess.run(["srun", "-n", "2", "--mpi=none", py, "-m", "mpidl", "run", TINY,
                        "--set", f'run.out="{tmp_path}"'], cwd=ROOT, env=_ompi_env(), capture_output=True,
                       text=True, timeout=300)
    _one_line_error(p, "srun --mpi=pmix")
