"""`mpidl run` with the fdg grid: each bad input is one error message and exit status 2 on every rank."""
import pytest

from test_cli import _run


@pytest.mark.parametrize("n,args,match", [
    (3, ["--set", "algorithm.stages=2"], "does not fit 3 MPI ranks"),                     # M x K != world
    (2, ["--set", "algorithm.stages=2", "--set", "model.name=linear"], "cuttable units"),  # K > units
    (2, ["--set", "algorithm.stages=2", "--set", "algorithm.cuts=[7]"], "does not fit"),   # bad cut list
    (2, ["--set", "algorithm.stages=2", "--set", "algorithm.beta=1.5"], "beta must lie in (0, 1]"),
])
def test_fdg_user_error_is_reported_once(n, args, match):
    proc = _run(n, "run", "--set", "algorithm.name=fdg", "--set", "data.dataset=digits", *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_fdg_training_run_end_to_end(tmp_path):
    proc = _run(2, "run", "--set", "algorithm.name=fdg", "--set", "algorithm.stages=2", "--set", "data.dataset=digits",
                "--set", "model.hidden=[16]", "--set", "run.batch_size=32", "--set", "run.epochs=2",
                "--set", f'run.out="{tmp_path}"', "--set", "run.name=fdg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished (done)" in proc.stdout and "fdg: 1 x 2 grid" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "fdg" / "results.h5").is_file()
