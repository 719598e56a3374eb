"""The CLI under mpiexec: a user error is one message and exit status 2 on every rank."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_mpi_suite import mpiexec

ROOT = Path(__file__).resolve().parent.parent


def _run(n, *args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*mpiexec(), "-n", str(n), sys.executable, "-m", "mpidl", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


# Each rank writes its own stdout, stderr and exit status to files named by its rank (MPICH's
# PMI_RANK or Open MPI's OMPI_COMM_WORLD_RANK), so every rank's behaviour is seen, not only
# mpiexec's combined exit status and output.
PER_RANK = ('r="${PMI_RANK:-$OMPI_COMM_WORLD_RANK}"; "$0" -m mpidl "$@" >"$D/out.$r" 2>"$D/err.$r"; '
            'echo $? >"$D/rc.$r"')


@pytest.mark.parametrize("args,match", [
    (["run", "--set", "algorithm.lrate=0.1"], "unknown key(s) lrate"),
    (["run", "--set", "topology.name=hypercube", "--set", "data.dataset=digits"], "power-of-two"),
    (["run", "--set", "data.dataset=mnist", "--set", 'data.data_dir="/nonexistent"'], "/nonexistent"),
])
def test_user_error_is_reported_once(args, match, tmp_path):
    n = 3
    env = dict(os.environ, OMP_NUM_THREADS="1", D=str(tmp_path))
    proc = subprocess.run([*mpiexec(), "-n", str(n), "sh", "-c", PER_RANK, sys.executable, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]           # the wrapper, not mpidl
    rcs = {r: (tmp_path / f"rc.{r}").read_text().strip() for r in range(n) if (tmp_path / f"rc.{r}").exists()}
    assert rcs == {r: "2" for r in range(n)}, f"exit status per rank {rcs}"
    err = {r: (tmp_path / f"err.{r}").read_text() for r in range(n)}
    lines = {r: [ln for ln in err[r].splitlines() if ln.strip()] for r in range(n)}
    assert len(lines[0]) == 1 and "error:" in lines[0][0] and match in lines[0][0], err[0][-3000:]
    assert all(lines[r] == [] for r in range(1, n)), {r: err[r][-1000:] for r in range(1, n)}
    assert not any("Traceback" in (tmp_path / f"out.{r}").read_text() for r in range(n))


def test_small_training_run_end_to_end(tmp_path):
    proc = _run(2, "run", "--set", "data.dataset=digits", "--set", "model.hidden=[16]",
                "--set", "run.batch_size=32", "--set", "run.epochs=2", "--set", f'run.out="{tmp_path}"',
                "--set", "run.name=e2e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished (done)" in proc.stdout
    assert (tmp_path / "e2e" / "results.h5").is_file()
    assert any((tmp_path / "e2e" / "checkpoints").glob("step_*"))


def test_resume_on_fewer_ranks_names_the_key_then_resizes(tmp_path):
    """A 4-rank checkpoint resumed by 2 ranks: without [run] resize one error naming the key on
    rank 0, exit 2 on every rank and the run folder untouched; with resize = "average" the
    documented command continues it, and `mpidl report` lists the resize."""
    import json
    import zlib
    from mpidl.plots import summary_table
    from mpidl.results import load_results
    base = ["run", "--set", "data.dataset=digits", "--set", "model.hidden=[16]", "--set", "run.batch_size=32",
            "--set", "run.steps=8", "--set", "run.checkpoint_every=4", "--set", f'run.out="{tmp_path}"',
            "--set", "run.name=rs", "--set", "algorithm.name=cdmsgd"]
    first = _run(4, *base, "--set", "run.steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "rs"
    snap = lambda: {p: (p.stat().st_size, p.stat().st_mtime_ns, zlib.crc32(p.read_bytes()))
                    for p in run.rglob("*") if p.is_file()}
    before = snap()
    env = dict(os.environ, OMP_NUM_THREADS="1", D=str(tmp_path))
    proc = subprocess.run([*mpiexec(), "-n", "2", "sh", "-c", PER_RANK, sys.executable, *base,
                           "--set", 'run.resume="auto"'], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rc.{r}").read_text().strip() for r in range(2)] == ["2", "2"]
    lines = [ln for ln in (tmp_path / "err.0").read_text().splitlines() if ln.strip()]
    assert len(lines) == 1 and 'set [run] resize = "average" to continue on 2 ranks' in lines[0], lines
    assert not (tmp_path / "err.1").read_text().strip()
    assert snap() == before, "the failed resume changed the run folder"
    ok = _run(2, *base, "--set", 'run.resume="auto"', "--set", 'run.resize="average"')
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "resize: checkpoint step 4" in ok.stdout + ok.stderr and "average of the 4 agents'" in ok.stdout + ok.stderr
    res = load_results(run / "results.h5")
    events = json.loads(res["attrs"]["events"])
    assert [(e["step"], e["from"], e["to"]) for e in events] == [(4, 4, 2)]
    assert "rs: resized at step 4: 4 -> 2 ranks" in summary_table([res])
