"""pdADMM through the CLI: each user error is one message and exit status 2."""
import pytest

from test_cli import _run

BASE = ["run", "--set", "data.dataset=digits", "--set", "algorithm.name=pdadmm", "--set", "run.batch_size=0"]


@pytest.mark.parametrize("args,match", [
    (["--set", "model.hidden=[8]"], "at most one rank per layer"),
    (["--set", "model.name=cnn"], "trains an MLP"),
    (["--set", "model.hidden=[100000000, 8]"], "GiB"),
    (["--set", "algorithm.rho=0.0"], "rho must be > 0"),
    (["--set", "algorithm.name=pdadmm-q", "--set", "algorithm.grid_points=1"], "cannot hold"),
])
def test_pdadmm_user_error_is_reported_once(args, match):
    proc = _run(3, *BASE, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
