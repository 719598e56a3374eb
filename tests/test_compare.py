"""`mpidl compare` as a user runs it (issue 22): a two-method, two-seed study end to end under
mpiexec, its report checked against numbers read back from the results files here with h5py,
a study killed with SIGKILL mid-run and rerun (finished runs are not redone, the half-finished
one resumes from its checkpoint), bad studies (exit 2, one line, no run started) and the
worked example of docs/compare.md."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpidl.study import StudyError, plan_study
from test_mpi_suite import mpiexec

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

TINY = """
title = "tiny"
seeds = [0, 1]
{budget}
[data]
dataset = "digits"
eval_samples = 200
[model]
hidden = [16]
[topology]
name = "ring"
[run]
batch_size = 32
log_every = 5
eval_every = 10
checkpoint_every = {ckpt}
[[method]]
algorithm = "cdmsgd"
lr = 0.05
momentum = 0.9
[[method]]
name = "central"
algorithm = "centralized"
lr = 0.05
[method.topology]
name = "complete"
"""


def _study(tmp_path, budget="epochs = 2", ckpt=20):
    p = tmp_path / "study.toml"
    p.write_text(TINY.format(budget=budget, ckpt=ckpt))
    return p


def _cmd(n, *args):
    return [*mpiexec(), "-n", str(n), sys.executable, "-m", "mpidl", "compare", *map(str, args)]


def _run(n, *args, timeout=300, env=None):
    return subprocess.run(_cmd(n, *args), cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def _numbers(path):
    """The final and best eval numbers of one results file, read here with h5py only."""
    with h5py.File(path, "r") as f:
        g = f["eval"]
        acc, wall, byts, ep = (g[c][()] for c in ("test_acc", "wall", "bytes_sent", "epoch"))
    j = int(np.argmax(acc))
    return {"acc": acc[-1], "wall": wall[-1], "bytes": byts[-1], "epoch": ep[-1], "best": acc[j],
            "best_epoch": ep[j], "best_wall": wall[j]}


def _mean_std(v):
    v = np.asarray(v, dtype=float)
    return v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)


def test_two_methods_two_seeds_report_matches_results_files(tmp_path):
    out = tmp_path / "out"
    proc = _run(2, _study(tmp_path), "--out", out, env=dict(ENV, MPIDL_LINK_RATE="1gbit (a test)"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    starts = [ln for ln in proc.stdout.splitlines() if re.search(r"run \d/4 .* started \(.*ETA", ln)]
    finish = [ln for ln in proc.stdout.splitlines() if re.search(r"run \d/4 .* finished .*ETA", ln)]
    assert len(starts) == 4 and len(finish) == 4, proc.stdout
    study = json.loads((out / "study.json").read_text())
    report = (out / "report.md").read_text()
    for m in ("cdmsgd", "central"):
        nums = [_numbers(out / m / f"seed{s}" / "results.h5") for s in (0, 1)]
        for s in (0, 1):
            with h5py.File(out / m / f"seed{s}" / "results.h5", "r") as f:
                cfg = json.loads(f.attrs["config"])
            assert cfg["run"]["seed"] == s and cfg["data"]["seed"] == s and cfg["run"]["epochs"] == 2.0
            assert (out / m / f"seed{s}" / "done.json").is_file()
        summ = study["methods"][m]["summary"]
        for key, col in (("final_test_acc", "acc"), ("final_wall", "wall"), ("final_bytes_sent", "bytes"),
                         ("final_epoch", "epoch"), ("best_test_acc", "best"), ("best_epoch", "best_epoch"),
                         ("best_wall", "best_wall")):
            mu, sd = _mean_std([n[col] for n in nums])
            assert summ[key]["n"] == 2
            assert math.isclose(summ[key]["mean"], mu, rel_tol=1e-12, abs_tol=1e-12), (m, key)
            assert math.isclose(summ[key]["std"], sd, rel_tol=1e-9, abs_tol=1e-12), (m, key)
        # the markdown row shows the same numbers
        row = next(ln for ln in report.splitlines() if ln.startswith(f"| {m} |"))
        mu, sd = _mean_std([n["acc"] for n in nums])
        assert f"{mu:.4f} ± {sd:.4f}" in row, row
        mu, sd = _mean_std([n["bytes"] for n in nums])
        assert f"{mu / 1e6:.4g} ± {sd / 1e6:.4g}" in row, row
        # every curve is in study.json, equal to the file's
        with h5py.File(out / m / "seed1" / "results.h5", "r") as f:
            assert study["methods"][m]["runs"]["1"]["curve"]["test_acc"] == f["eval/test_acc"][()].tolist()
        grid = study["methods"][m]["grid"]["epoch"]
        assert len(grid["x"]) == len(grid["mean"]) == len(grid["std"]) > 1
        # the curves' mean and std over seeds on each grid, recomputed from the files: the seeds'
        # accuracies differ, so a mean that is one seed's curve or a zero std would show
        for col in ("epoch", "wall", "bytes_sent"):
            g = study["methods"][m]["grid"][col]
            ys = []
            for s in (0, 1):
                with h5py.File(out / m / f"seed{s}" / "results.h5", "r") as f:
                    cx, cy = f[f"eval/{col}"][()], f["eval/test_acc"][()]
                assert cx[0] - 1e-9 <= g["x"][0] and g["x"][-1] <= cx[-1] + 1e-9, (m, col)
                ys.append(np.interp(g["x"], cx, cy))
            assert not np.allclose(ys[0], ys[1]), (m, col, "the seeds' curves are equal")
            assert g["seeds"] == 2 and np.allclose(g["mean"], np.mean(ys, 0), rtol=0, atol=1e-12), (m, col)
            assert np.allclose(g["std"], np.std(ys, 0, ddof=1), rtol=0, atol=1e-12), (m, col)
    _check_machine_and_load(out, study, report)
    for tag in ("wall", "bytes", "epoch"):
        assert (out / f"test_acc_vs_{tag}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp")), "half-written files left behind"
    # --report-only rewrites the same numbers from disk
    before = study["methods"]
    assert _run(1, _study(tmp_path), "--out", out, "--report-only").returncode == 0
    after = json.loads((out / "study.json").read_text())["methods"]
    assert {m: v["summary"] for m, v in after.items()} == {m: v["summary"] for m, v in before.items()}


def _check_machine_and_load(out, study, report):
    """Where the runs ran (MPIDL_LINK_RATE, the MPI's nodes) and each run's load samples, in
    done.json, study.json and report.md: the per-method load is the mean of the runs' means."""
    import platform
    assert study["machine"] == [{"ranks": 2, "nodes": 1, "ranks_per_node": [2], "link": "1gbit (a test)",
                                 "host": platform.node(), "cpus": os.cpu_count()}], study["machine"]
    line = next(ln for ln in report.splitlines() if ln.startswith("Machine: "))
    assert "2 ranks on 1 node(s) (2 per node), link 1gbit (a test)" in line, line
    means = []
    for m in ("cdmsgd", "central"):
        loads = []
        for s in (0, 1):
            ld = study["methods"][m]["runs"][str(s)]["load"]
            assert ld == json.loads((out / m / f"seed{s}" / "done.json").read_text())["load"]
            assert ld["samples"] >= 2 and 0 <= ld["min"] <= ld["mean"] <= ld["max"], ld
            loads.append(ld["mean"])
            run_row = next(ln for ln in report.splitlines() if ln.startswith(f"| {m} | {s} |"))
            assert f"| {ld['mean']:.1f} |" in run_row, run_row
        mu, sd = _mean_std(loads)
        summ = study["methods"][m]["summary"]["load"]
        assert summ["n"] == 2 and math.isclose(summ["mean"], mu, rel_tol=1e-12, abs_tol=1e-12), (m, summ)
        row = next(ln for ln in report.splitlines() if ln.startswith(f"| {m} | "))
        assert f"{mu:.1f} ± {sd:.1f}" in row, row
        means += loads
    assert math.isclose(study["load"]["mean"], float(np.mean(means)), rel_tol=1e-12) and study["load"]["runs"] == 4
    assert f"mean {np.mean(means):.1f}" in line and "over 4 run(s)" in line, line


def test_load_sampler_summary(monkeypatch):
    """The sampler's mean/min/max are those of the values os.getloadavg returned (start, ticks, end)."""
    import time

    from mpidl import study as S
    values = iter([3.0, 1.0, 5.0, 2.0, 4.0, 6.0, 7.0, 8.0])
    seen = []

    def fake():
        v = next(values, 9.0)
        seen.append(v)
        return (v, 0.0, 0.0)
    monkeypatch.setattr(S.os, "getloadavg", fake)
    with S._LoadSampler(period=0.01) as ld:
        time.sleep(0.05)
    got = ld.summary()
    assert got["samples"] == len(seen) >= 3
    assert got["mean"] == sum(seen) / len(seen) and got["min"] == min(seen) and got["max"] == max(seen)


def test_killed_study_resumes_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "out"
    study = _study(tmp_path, budget="wall_seconds = 4", ckpt=10)
    proc = subprocess.Popen(_cmd(2, study, "--out", out), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first, second = out / "cdmsgd" / "seed0", out / "cdmsgd" / "seed1"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (first / "done.json").exists() and any((second / "checkpoints").glob("step_*[0-9]")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study ended before it could be killed:\n" + proc.stdout.read()
        assert (first / "done.json").exists() and not (second / "done.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank
        proc.communicate()
    stamp = {p: p.stat().st_mtime_ns for p in (first / "done.json", first / "results.h5")}
    again = _run(2, study, "--out", out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout
    assert "1 already finished" in log and "3 run(s) to do" in log, log
    assert "cdmsgd seed 0 started" not in log, log
    assert "cdmsgd seed 1 resuming from its checkpoint" in log, log
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp, "a finished run was redone"
    for m in ("cdmsgd", "central"):
        for s in (0, 1):
            d = out / m / f"seed{s}"
            assert json.loads((d / "done.json").read_text())["stop"] == "budget"
            with h5py.File(d / "results.h5", "r") as f:
                wall = f["train/wall"][()]
                resumes = json.loads(f.attrs["resumes"])
            assert np.all(np.diff(wall) > 0) and wall[-1] >= 4.0 and wall[-2] < 4.0, (m, s, wall[-3:])
            assert bool(resumes) == (d == second), (m, s, resumes)
    # a third invocation has nothing to do
    third = _run(1, study, "--out", out)
    assert third.returncode == 0 and "0 run(s) to do, 4 already finished" in third.stdout, third.stdout


BAD = [
    ('[[method]]\nalgorithm = "nosuch"', "epochs = 1", "method 'nosuch': unknown algorithm 'nosuch'"),
    ("", "epochs = 1", "the study lists no methods"),
    ('[[method]]\nalgorithm = "cdmsgd"', "epochs = 0", "budget epochs must be a number > 0"),
    ('[[method]]\nalgorithm = "pdadmm"\n[method.run]\nbatch_size = 0', "epochs = 1",
     "method 'pdadmm': pdadmm trains a layer-parallel MLP (model.name = \"mlp\"), the study's model is 'cnn'"),
]


@pytest.mark.parametrize("methods,budget,match", BAD, ids=["unknown-algorithm", "no-methods", "budget-0",
                                                            "model-form"])
def test_bad_study_is_one_error_exit_2_before_any_run(methods, budget, match, tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(f'seeds = [0]\n{budget}\n[data]\ndataset = "digits"\n[model]\nname = "cnn"\n{methods}\n')
    n = 2
    per_rank = ('r="${PMI_RANK:-$OMPI_COMM_WORLD_RANK}"; "$0" -m mpidl "$@" >"$D/out.$r" 2>"$D/err.$r"; '
                'echo $? >"$D/rc.$r"')
    env = dict(ENV, D=str(tmp_path))
    proc = subprocess.run([*mpiexec(), "-n", str(n), "sh", "-c", per_rank, sys.executable, "compare", str(p),
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rcs = {r: (tmp_path / f"rc.{r}").read_text().strip() for r in range(n)}
    assert rcs == {r: "2" for r in range(n)}, rcs
    lines = {r: [ln for ln in (tmp_path / f"err.{r}").read_text().splitlines() if ln.strip()] for r in range(n)}
    assert len(lines[0]) == 1 and lines[0][0].startswith("mpidl compare: error: ") and match in lines[0][0], lines
    assert lines[1] == [], lines[1]
    assert not (tmp_path / "out").exists(), "a run started"


@pytest.mark.parametrize("extra,match", [
    ("epochs = 1\nwall_seconds = 3", "exactly one budget"),
    ("bytes = -5", "budget bytes must be a number > 0"),
    ("epochs = 1\n[run]\nseed = 3", "[run] seed: set by the study"),
    ("epochs = 1\n[[method]]\nalgorithm = \"cdmsgd\"\n[[method]]\nalgorithm = \"cdmsgd\"", "two methods are named 'cdmsgd'"),
    ("epochs = 1\n[[method]]\nalgorithm = \"fdg\"\nstages = 3", "M x K must equal the world size"),
    ("epochs = 1\n[[method]]\nalgorithm = \"cdmsgd\"\nlrate = 1", "method 'cdmsgd': unknown key(s) lrate"),
    ("epochs = 1\n[[method]]\nalgorithm = \"cdmsgd\"\n[method.run]\nepochs = 9", "set by the study"),
    ("epochs = 1\n[[method]]\nalgorithm = \"pdadmm\"\n[method.run]\nbatch_size = 0", "at most one layer per rank"),
    ("epochs = 1\nseeds = []\n[[method]]\nalgorithm = \"cdmsgd\"", "seeds must be a non-empty list"),
])
def test_plan_rejects(extra, match, tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(f'{extra}\n[data]\ndataset = "digits"\n')
    with pytest.raises(StudyError) as e:
        plan_study(p, 4)
    assert match in str(e.value)


def test_plan_builds_one_validated_config_per_method_and_seed(tmp_path):
    plan = plan_study(_study(tmp_path, budget="bytes = 1e6"), 2, out=str(tmp_path / "o"))
    assert [(r["method"], r["seed"]) for r in plan["runs"]] == [("cdmsgd", 0), ("cdmsgd", 1), ("central", 0),
                                                               ("central", 1)]
    c = plan["runs"][2]["config"]
    assert c["topology"]["name"] == "complete" and c["algorithm"] == {**c["algorithm"], "name": "centralized"}
    assert c["run"]["out"] == str(tmp_path / "o" / "central") and c["run"]["name"] == "seed0"
    assert c["run"]["resume"] == "auto" and c["run"]["epochs"] == 1000.0
    assert plan["runs"][0]["config"]["topology"]["name"] == "ring"


def test_docs_worked_example_runs(tmp_path):
    doc = (ROOT / "docs" / "compare.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    cmd = re.search(r"```\n(mpiexec -n (\d+) python -m mpidl compare (\S+))\n", doc)
    assert cmd, "docs/compare.md shows the command"
    (tmp_path / Path(cmd.group(3)).name).write_text(toml)
    out = tmp_path / "out"
    proc = _run(int(cmd.group(2)), tmp_path / Path(cmd.group(3)).name, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    names = re.findall(r'^name = "([^"]+)"|^algorithm = "([^"]+)"', toml, re.M)
    assert names and "| method |" in report
    for png in ("test_acc_vs_wall.png", "test_acc_vs_bytes.png", "test_acc_vs_epoch.png"):
        assert (out / png).is_file()
