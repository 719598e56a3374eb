"""kill -9 of a rank after a checkpoint, then resume: no results row up to the checkpoint is lost
and the wall time continues (issue 10).  Runs `mpidl run` under mpiexec like a user would."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpidl.checkpoint import CheckpointStore
from mpidl.metrics import load_results
from test_mpi_suite import mpiexec

ROOT = Path(__file__).resolve().parent.parent
LOG, EVAL, CKPT = 5, 10, 20


def _args(out, steps):
    return ["run", "--set", "data.dataset=digits", "--set", "model.hidden=[16]", "--set", "run.batch_size=32",
            "--set", f"run.steps={steps}", "--set", f"run.log_every={LOG}", "--set", f"run.eval_every={EVAL}",
            "--set", f"run.checkpoint_every={CKPT}", "--set", f'run.out="{out}"', "--set", 'run.name="crash"',
            "--resume", "auto"]


def _start(out, steps):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([*mpiexec(), "-n", "2", sys.executable, "-m", "mpidl", *_args(out, steps)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _descendants(pid):
    children = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rank_pid(rank, under=None, **env_match):
    """The pid of the Python `mpidl` process of MPI rank ``rank`` (PMI_RANK, OMPI_COMM_WORLD_RANK
    or SLURM_PROCID in its environment), among the descendants of ``under`` or every process,
    whose environment also holds ``env_match``; None if there is none."""
    pids = _descendants(under) if under is not None else [int(p.name) for p in Path("/proc").iterdir()
                                                          if p.name.isdigit()]
    for pid in pids:
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            cmdline = Path(f"/proc/{pid}/cmdline").read_text()
        except (OSError, UnicodeDecodeError):
            continue
        r = env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("SLURM_PROCID")))
        # argv[0] must be a Python: srun (and the batch shell) also carry SLURM_PROCID=0 and
        # "mpidl" in their command line, and killing srun is not the death of a rank
        argv0 = Path(cmdline.split("\0", 1)[0]).name
        if (r == str(rank) and argv0.startswith("python") and "mpidl" in cmdline
                and all(env.get(k) == v for k, v in env_match.items())):
            return pid
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the rank processes")
def test_kill9_rank0_after_checkpoint_then_resume_keeps_rows_and_wall_time(tmp_path):
    proc = _start(tmp_path, 100000)
    ckpts = tmp_path / "crash" / "checkpoints"
    t0 = time.monotonic()
    try:
        while not (ckpts / f"step_{2 * CKPT:08d}" / "manifest.json").exists():
            if proc.poll() is not None:
                pytest.fail(f"run ended early: {proc.communicate()[1][-3000:]}")
            if time.monotonic() - t0 > 240:
                pytest.fail("no checkpoint after 240 s")
            time.sleep(0.02)
        victim = rank_pid(0, under=proc.pid)
        assert victim is not None, "rank 0 not found"
        os.kill(victim, signal.SIGKILL)  # the results writer dies the way a node dies
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    c = CheckpointStore(ckpts).latest()
    res = tmp_path / "crash" / "results.h5"
    wall_c = check_rows_up_to(load_results(res), c, LOG, EVAL, CKPT)  # the .tmp the crashed run left

    end = c + 2 * LOG
    proc = _start(tmp_path, end)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out + err
    check_resumed(load_results(res), res, c, end, wall_c, LOG, EVAL)


def check_rows_up_to(results, c, log_every, eval_every, ckpt_every):
    """After a crash: every train / eval row up to checkpoint ``c`` is there; return the wall time at ``c``."""
    assert c is not None and c >= 2 * ckpt_every and c % ckpt_every == 0, c
    for name, every in (("train", log_every), ("eval", eval_every)):
        steps = results["series"][name]["step"]
        assert set(range(every, c + 1, every)) <= set(steps.tolist()), (name, c, steps)
    tr = results["series"]["train"]
    return float(tr["wall_time"][tr["step"] == c][0])


def check_resumed(results, path, c, end, wall_c, log_every, eval_every):
    """After the resume from ``c`` to ``end``: every row once, the wall time continues from ``wall_c``."""
    assert results["path"] == str(path)  # finished: renamed from .tmp
    for name, every in (("train", log_every), ("eval", eval_every)):
        s = results["series"][name]
        want = list(range(every, end + 1, every))
        want += [end] if want[-1] != end else []  # the last step always gets its rows
        assert s["step"].tolist() == want, (name, s["step"])
        assert np.all(np.diff(s["wall_time"]) >= 0), (name, s["wall_time"])
    tr = results["series"]["train"]
    after = tr["wall_time"][tr["step"] > c]
    assert after.size and after.min() >= wall_c, (wall_c, after)  # continues, not from 0
    assert float(tr["wall_time"][tr["step"] == c][0]) == wall_c     # the rows before are untouched
