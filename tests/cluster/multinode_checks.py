"""Multi-node checks on an emulated cluster (issue 28); run by ``bash scripts/test-cluster.sh``.

Not collected by the default ``python -m pytest`` (the file name does not match ``test_*.py``).
Needs root and an emulated cluster of 2 nodes whose links are shaped
(``scripts/cluster/vnodes.sh start 2 DIR --rate 100mbit``, DIR in ``MPIDL_VNODES``), and the
Pythons to check: this one (mpi4py over the MPICH wheel, the README's set-up) and, when set,
``MPIDL_OMPI_PYTHON`` (mpi4py over Open MPI). For each MPI, two launches of
tests/cluster/multinode_run.py at 4 ranks: 2 nodes x 2 ranks through ``DIR/mpiexec``, and 4 ranks
on one node through the MPI's own mpiexec. Then:

* placement: ranks 0,1 on vnode0 and 2,3 on vnode1; the node-local rank, node index and node
  count that mpidl computes; the device a rank takes with 1 and 2 GPUs (``cuda:(local rank mod
  GPUs)``: a rank on the second node takes local GPU 0);
* LSGD ``groups = "node"``: one group per node, its members on that node, the local leader the
  group's lowest rank (the election's value is the rank), the global leader rank 0;
* the shaped link carries the inter-node bytes: a 2.5 MB message to the other node takes at least
  0.8 x its time at the link rate (a lower bound that load cannot break);
* every family's short run on 2 nodes ends with the checkpoint of the same run on one node, bitwise
  (LSGD groups = "node" against groups = "size", group_size = 2 on one node: the same groups);
  asynchronous LSGD ends with a finite accuracy;
* kill -9 of a rank on the second node mid-run ends the job on every node within seconds, and a
  resume from the last checkpoint ends bitwise equal to the uninterrupted run (MPICH; Open MPI
  too unless MPIDL_MULTINODE_KILL=mpich);
* a node whose namespace is gone: the launch fails at once with an error naming the node;
* the commands of docs/clusters.md, "A cluster on one machine".
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from mpidl.h5state import open_read, read_tree

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_crash_resume import rank_pid  # noqa: E402

VN = os.environ.get("MPIDL_VNODES", "")
BIN = str(Path(sys.executable).parent)
OMPI_PY = os.environ.get("MPIDL_OMPI_PYTHON", "")
RUN = str(ROOT / "tests" / "cluster" / "multinode_run.py")
DETERMINISTIC = ["cdmsgd", "centralized", "fedavg", "lsgd", "lsgd_groups", "easgd", "fdg", "pdadmm", "next"]
VNODES = str(ROOT / "scripts" / "cluster" / "vnodes.sh")


def _vn_env():
    env = {}
    for line in (Path(VN) / "vnodes.env").read_text().splitlines():
        k, _, v = line.partition("=")
        env[k] = v
    return env


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not VN or not (Path(VN) / "vnodes.env").is_file():
        pytest.fail("no emulated cluster: run these checks through scripts/test-cluster.sh "
                    "(or set MPIDL_VNODES to a DIR started by scripts/cluster/vnodes.sh start 2 DIR --rate 100mbit)")
    env = _vn_env()
    assert env["VN_K"] == "2" and int(env["VN_RATE_BITS"]) > 0, env
    return env


MPIS = [pytest.param("mpich", sys.executable, id="mpich")]
if OMPI_PY:
    MPIS.append(pytest.param("openmpi", OMPI_PY, id="openmpi"))


def _env(python):
    # the ranks must import this checkout; the launcher and python of that MPI first on PATH
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PATH=str(Path(python).parent) + os.pathsep + os.environ["PATH"])
    # Open MPI as root, and without the cross-memory attach containers forbid (as test-cluster.sh)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    return env


def _one_node_mpiexec(mpi, python):
    if mpi == "mpich":
        return [str(Path(python).parent / "mpiexec")]
    return ["mpiexec.openmpi", "--oversubscribe", "--bind-to", "none"]


def _launch(cmd, env, timeout=900):
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... hung past {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    assert p.returncode == 0, f"{' '.join(cmd[:8])} ... exited {p.returncode}\n{out[-4000:]}\n{err[-4000:]}"
    return out + err


_RUNS = {}


def runs(mpi, python, tmp_path_factory):
    """The two launches of one MPI (made once per module): {'two': OUT, 'one': OUT}."""
    if mpi not in _RUNS:
        base = tmp_path_factory.mktemp(f"multinode-{mpi}")
        env = _env(python)
        t = time.monotonic()
        _launch([f"{VN}/mpiexec", "-n", "4", python, RUN, str(base / "two")], env)
        t2 = time.monotonic()
        _launch([*_one_node_mpiexec(mpi, python), "-n", "4", python, RUN, str(base / "one"), "--no-link",
                 "--groups", "size:2"], env)
        print(f"[multinode] {mpi}: 2 nodes {t2 - t:.0f} s, one node {time.monotonic() - t2:.0f} s")
        _RUNS[mpi] = {"two": base / "two", "one": base / "one"}
    return _RUNS[mpi]


@pytest.mark.parametrize("mpi,python", MPIS)
def test_placement_node_facts_and_devices(mpi, python, tmp_path_factory):
    rows = json.loads((runs(mpi, python, tmp_path_factory)["two"] / "placement.json").read_text())
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        node = r["rank"] // 2                                    # block placement, 2 ranks per node
        assert r["host"] == f"vnode{node}", r
        assert (r["node"], r["n_nodes"], r["local_rank"], r["local_size"], r["node_leader"]) == \
            (node, 2, r["rank"] % 2, 2, 2 * node), r
        assert r["devices"] == {"1": "cuda:0", "2": f"cuda:{r['rank'] % 2}"}, r   # rank 2 -> local GPU 0
    one = json.loads((runs(mpi, python, tmp_path_factory)["one"] / "placement.json").read_text())
    assert {(r["n_nodes"], r["local_size"]) for r in one} == {(1, 4)}, one


@pytest.mark.parametrize("mpi,python", MPIS)
def test_lsgd_groups_node_one_group_per_node(mpi, python, tmp_path_factory):
    rows = json.loads((runs(mpi, python, tmp_path_factory)["two"] / "placement.json").read_text())
    host = {r["rank"]: r["host"] for r in rows}
    for r in rows:
        g = r["lsgd"]
        assert g["n_groups"] == 2, g
        assert g["group_ranks"] == [q for q in range(4) if host[q] == r["host"]], (r["host"], g)
        assert g["group_rank"] == g["group_ranks"].index(r["rank"]) and g["group_size"] == 2, g
        assert g["local_winner"] == min(g["group_ranks"]) and g["global_winner"] == 0, g


@pytest.mark.parametrize("mpi,python", MPIS)
def test_shaped_link_carries_the_inter_node_bytes(mpi, python, tmp_path_factory, cluster):
    link = json.loads((runs(mpi, python, tmp_path_factory)["two"] / "link.json").read_text())
    at_rate = 8 * link["bytes"] / int(cluster["VN_RATE_BITS"])
    assert link["far"] >= 0.8 * at_rate, (link, at_rate)     # the bytes crossed the shaped link
    # (link["near"], inside a node, is recorded but not asserted: an upper bound on a time is
    # what a loaded machine breaks; seen here: 0.76 s for 2.5 MB through Open MPI's vader at load 15)


def _rank_states(run_dir):
    ck = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ck and (ck[-1] / "manifest.json").is_file(), run_dir
    out = {}
    for f in sorted(ck[-1].glob("rank_*.h5")):
        with open_read(f) as h:
            out[f.name] = read_tree(h)
    return ck[-1].name, out


def _assert_same(a, b, path):
    if isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), path
    else:
        assert a == b or (a != a and b != b), (path, a, b)


def _algo_state(tree):
    # the algorithm's state (parameters, momentum, leader copies, ...): not the RNG of NumPy's global
    # generator, which the process's earlier runs moved, nor the run's clocks
    st = tree["state"]
    assert "algo" in st, sorted(st)
    return st["algo"]


@pytest.mark.parametrize("mpi,python", MPIS)
@pytest.mark.parametrize("family", DETERMINISTIC)
def test_family_on_two_nodes_equals_one_node(mpi, python, family, tmp_path_factory):
    r = runs(mpi, python, tmp_path_factory)
    step_two, two = _rank_states(r["two"] / family)
    step_one, one = _rank_states(r["one"] / family)
    assert step_two == step_one and len(two) == 4 and set(two) == set(one), (step_two, step_one, sorted(two))
    for name in two:
        _assert_same(_algo_state(two[name]), _algo_state(one[name]), f"{family}/{name}")
    fam2 = json.loads((r["two"] / "families.json").read_text())[family]
    fam1 = json.loads((r["one"] / "families.json").read_text())[family]
    assert fam2["test_acc"] == fam1["test_acc"], (fam2, fam1)


@pytest.mark.parametrize("mpi,python", MPIS)
def test_async_lsgd_on_two_nodes_finishes(mpi, python, tmp_path_factory):
    fam = json.loads((runs(mpi, python, tmp_path_factory)["two"] / "families.json").read_text())["lsgd_async"]
    assert fam["step"] == 20 and np.isfinite(fam["test_acc"]) and 0.0 <= fam["test_acc"] <= 1.0, fam


# -- kill -9 of a rank on the second node, then resume ------------------------------------------
KILL_ARGS = ["run", "--set", "data.dataset=digits", "--set", "model.hidden=[16]", "--set", "run.batch_size=32",
             "--set", "run.log_every=5", "--set", "run.eval_every=10", "--set", "run.checkpoint_every=20",
             "--set", 'run.name="kill"', "--resume", "auto"]


def _mpidl(launcher, python, out, steps):
    return [*launcher, "-n", "4", python, "-m", "mpidl", *KILL_ARGS, "--set", f"run.steps={steps}",
            "--set", f'run.out="{out}"']


KILL_MPIS = [m for m in MPIS if m.values[0] == "mpich" or os.environ.get("MPIDL_MULTINODE_KILL", "both") == "both"]


@pytest.mark.parametrize("mpi,python", KILL_MPIS)
def test_kill9_rank_on_second_node_then_resume(mpi, python, tmp_path):
    env = dict(_env(python), MPIDL_VNODES_TAG=f"kill-{os.getpid()}-{time.monotonic_ns()}")
    launcher = [f"{VN}/mpiexec"]
    p = subprocess.Popen(_mpidl(launcher, python, tmp_path / "crash", 100000), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpts = tmp_path / "crash" / "kill" / "checkpoints"
    try:
        t0 = time.monotonic()
        while not (ckpts / "step_00000040" / "manifest.json").exists():
            if p.poll() is not None:
                pytest.fail(f"run ended early: {p.communicate()[1][-3000:]}")
            assert time.monotonic() - t0 < 240, "no checkpoint after 240 s"
            time.sleep(0.05)
        victim = rank_pid(3, under=None, MPIDL_VNODES_TAG=env["MPIDL_VNODES_TAG"])
        assert victim is not None, "rank 3 (on vnode1) not found"
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        p.communicate(timeout=60)
        ended = time.monotonic() - t_kill
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode != 0
    assert ended < 30, f"the job took {ended:.1f} s to end after rank 3 died"
    # nothing of the job is left on any node within 30 s of the kill (the launcher may exit while
    # the other nodes' ranks are still being killed: seen once at load 6)
    left = list(range(4))
    while left and time.monotonic() - t_kill < 30:
        left = [r for r in left if rank_pid(r, MPIDL_VNODES_TAG=env["MPIDL_VNODES_TAG"]) is not None]
        time.sleep(0.2)
    assert not left, f"ranks {left} still run {time.monotonic() - t_kill:.0f} s after rank 3 died"
    from mpidl.checkpoint import CheckpointStore
    c = CheckpointStore(ckpts).latest()
    assert c is not None and c >= 40 and c % 20 == 0, c
    end = c + 20
    _launch(_mpidl(launcher, python, tmp_path / "crash", end), env)
    _launch(_mpidl(launcher, python, tmp_path / "straight", end), env)
    s_res, res = _rank_states(tmp_path / "crash" / "kill")
    s_str, straight = _rank_states(tmp_path / "straight" / "kill")
    assert s_res == s_str == f"step_{end:08d}", (s_res, s_str)
    for name in straight:
        _assert_same(_algo_state(res[name]), _algo_state(straight[name]), f"resumed/{name}")


# -- a node that is gone -------------------------------------------------------------------------
def test_launch_with_a_node_gone_fails_fast_naming_it(tmp_path):
    d = tmp_path / "vn"
    subprocess.run(["bash", VNODES, "start", "2", str(d)], check=True, capture_output=True, timeout=60)
    try:
        vid = dict(line.split("=", 1) for line in (d / "vnodes.env").read_text().split())["VN_ID"]
        subprocess.run(["ip", "netns", "delete", f"mpidl-vn{vid}-1"], check=True, timeout=30)
        t = time.monotonic()
        p = subprocess.run([str(d / "mpiexec"), "-n", "2", sys.executable, "-c", "print(1)"],
                           capture_output=True, text=True, timeout=90, env=_env(sys.executable))
        assert time.monotonic() - t < 60
        assert p.returncode != 0 and "vnode1" in p.stderr and "gone" in p.stderr, p.stderr
        # the agent says the same when the namespace vanishes after the launcher's check
        p = subprocess.run([str(d / "agent"), "vnode1", "true"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 255 and "vnode1" in p.stderr, p.stderr
    finally:
        subprocess.run(["bash", VNODES, "stop", str(d)], capture_output=True, timeout=60)
    assert not (d / "vnodes.env").exists()
    assert f"mpidl-vn{vid}-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# -- the documented commands ---------------------------------------------------------------------
def test_docs_cluster_on_one_machine(tmp_path):
    """docs/clusters.md, "A cluster on one machine": its LSGD command on the running 2-node
    cluster (with a short budget appended) logs one group per node."""
    doc = (ROOT / "docs" / "clusters.md").read_text()
    sec = doc.split("## A cluster on one machine", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^bash scripts/cluster/vnodes\.sh start 2 (\S+) --rate 100mbit$", sec, re.M), sec[:2000]
    cmds = re.findall(r"^(\S+)/mpiexec -n 4 python -m mpidl run (jobs/configs/lsgd_fmnist\.toml .*)$", sec, re.M)
    assert len(cmds) == 1, cmds
    args = shlex.split(cmds[0][1]) + ["--set", "run.steps=4", "--set", "data.eval_samples=64", "--set",
                                      "run.log_every=2", "--set", f'run.out="{tmp_path}"']
    out = _launch([f"{VN}/mpiexec", "-n", "4", sys.executable, "-m", "mpidl", "run", *args], _env(sys.executable))
    assert re.search(r"lsgd groups = node: 2 group\(s\): ranks 0,1 on vnode0; ranks 2,3 on vnode1", out), out[-3000:]


# -- Slurm with one slurmd per emulated node ------------------------------------------------------
def _on_vnode0(cmd, timeout=120):
    return subprocess.run([f"{VN}/agent", "vnode0", cmd], capture_output=True, text=True, timeout=timeout)


def _slurm_logs(sl, n=15):
    return "".join(f"--- {f.name} ---\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]) + "\n"
                   for f in sorted((sl / "log").glob("*.log")))


PMI2_GARBLED = "mpi/pmi2: invalid client request"
"""Slurm's pmi2 plugin, when the MPICH wheel's PMI2 client sends it a garbled request during
MPI_Init: a segment of the business-card allgather carries bytes of unrelated memory, and the
job then hangs in MPI_Init.  Seen here in 3 of 11 launches of the two-node lsgd job, never in the
probe job.  docs/clusters.md, "Slurm across emulated nodes", describes it."""


def _sbatch_until_done(env, tmp_path, name, args, sl, attempts=4):
    """Submit one job on vnode0 and wait for it; a job hit by the PMI2 start-up fault above is
    cancelled at once and submitted again (at most ``attempts`` times, each a warning in pytest's summary).
    Returns the job's output."""
    for attempt in range(1, attempts + 1):
        q = _on_vnode0(f"{env} && sbatch --parsable --output={tmp_path}/{name}-%j-a{attempt}.out {args}")
        assert q.returncode == 0, q.stdout + q.stderr
        job = q.stdout.strip().split(";")[0]
        f = tmp_path / f"{name}-{job}-a{attempt}.out"
        t, garbled = time.monotonic(), False
        while True:
            q = _on_vnode0(f"{env} && squeue -h -j {job}")
            if not q.stdout.strip():
                break
            if f.exists() and PMI2_GARBLED in f.read_text(errors="replace"):
                garbled = True
                _on_vnode0(f"{env} && scancel {job}")
                time.sleep(3)
                break
            assert time.monotonic() - t < 300, f"job {name} did not finish in 300 s:\n{q.stdout}\n{_slurm_logs(sl)}"
            time.sleep(2)
        text = f.read_text(errors="replace") if f.exists() else f"(no output file {f.name})\n{_slurm_logs(sl)}"
        if not garbled and PMI2_GARBLED not in text:
            return text
        import warnings   # in pytest's warnings summary, so a pass that needed a resubmission says so
        warnings.warn(f"[multinode] job {name} attempt {attempt}: Slurm's pmi2 plugin got a garbled request from "
                      f"MPICH's PMI2 client in MPI_Init ({PMI2_GARBLED!r}); cancelled"
                      + (", submitting again" if attempt < attempts else ""), stacklevel=1)
    raise AssertionError(f"job {name}: the PMI2 start-up fault in all {attempts} attempts:\n{text[-3000:]}")


def test_sbatch_two_nodes_lsgd_groups_node(tmp_path):
    """scripts/cluster/slurm.sh start DIR --vnodes VN: `sbatch -N 2 jobs/lsgd.sbatch` (MPICH,
    srun --mpi=pmi2) runs one world over both nodes, SLURM_NODEID differs between them, and
    groups = "node" makes one group per node."""
    # a short folder: slurmd's spool holds Unix sockets named after the job, and a path over 108
    # bytes fails the job's launch (seen under pytest's /tmp/pytest-of-root/pytest-NNN/<test>/...)
    sl = Path(tempfile.mkdtemp(prefix="mpidl-sl.", dir="/tmp"))
    p = subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "slurm.sh"), "start", str(sl), "--vnodes", VN],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    try:
        env = (f"cd {shlex.quote(str(ROOT))} && export PATH={shlex.quote(BIN)}:$PATH OMP_NUM_THREADS=1 "
               f"UCX_TLS=tcp,self SLURM_CONF={sl}/slurm.conf PYTHONPATH={shlex.quote(str(ROOT))}")
        probe = tmp_path / "probe.sh"
        probe.write_text("#!/bin/bash\nsrun --mpi=pmi2 python -c 'import os, socket; from mpi4py import MPI; "
                         "c = MPI.COMM_WORLD; print(\"task\", c.Get_rank(), c.Get_size(), socket.gethostname(), "
                         "os.environ[\"SLURM_NODEID\"], flush=True)'\n")
        out = {}
        for name, args in (("probe", f"-N 2 --ntasks-per-node=2 {probe}"),
                           ("lsgd", f"-N 2 --ntasks-per-node=2 --cpus-per-task=1 "
                                    f"--export=ALL,CONFIG=tests/cluster/tiny.toml jobs/lsgd.sbatch "
                                    f"--set algorithm.name=lsgd --set algorithm.groups=node --set run.steps=20 "
                                    f"--set run.out='\"{tmp_path / 'runs'}\"'")):
            out[name] = _sbatch_until_done(env, tmp_path, name, args, sl)
        tasks = sorted(tuple(line.split()[1:]) for line in out["probe"].splitlines() if line.startswith("task "))
        assert tasks == [("0", "4", "vnode0", "0"), ("1", "4", "vnode0", "0"), ("2", "4", "vnode1", "1"),
                         ("3", "4", "vnode1", "1")], out["probe"]
        assert "lsgd groups = node: 2 group(s): ranks 0,1 on vnode0; ranks 2,3 on vnode1" in out["lsgd"], out["lsgd"]
        assert "finished (done) at step 20/20" in out["lsgd"], out["lsgd"][-3000:] + _slurm_logs(sl)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "slurm.sh"), "stop", str(sl)], capture_output=True,
                       timeout=120)
        shutil.rmtree(sl, ignore_errors=True)
