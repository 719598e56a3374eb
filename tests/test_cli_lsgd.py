"""LSGD / EASGD bad input through the CLI: one message, exit status 2 on every rank."""
import pytest

from test_cli import _run


@pytest.mark.parametrize("args,match", [
    (["--set", "algorithm.name=lsgd", "--set", "algorithm.groups=size", "--set", "algorithm.group_size=2"],
     "group_size 2 does not divide the 3 workers"),
    (["--set", "algorithm.name=lsgd", "--set", "algorithm.lam=1.0"], "lam must lie in [0, 1)"),
    (["--set", "algorithm.name=easgd", "--set", "algorithm.tau=0"], "tau must be >= 1"),
])
def test_lsgd_user_error_is_reported_once(args, match, tmp_path):
    proc = _run(3, "run", "--set", "data.dataset=digits", "--set", f'run.out="{tmp_path}"', *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
