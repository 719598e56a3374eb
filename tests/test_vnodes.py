"""scripts/cluster/vnodes.sh, the emulated cluster (issue 28): bad input, the life cycle of a
cluster, and that stop leaves nothing behind. The MPI checks across its nodes are in
tests/cluster/multinode_checks.py (run by scripts/test-cluster.sh)."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VNODES = str(ROOT / "scripts" / "cluster" / "vnodes.sh")
ROOTED = os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "tc", "nsenter", "unshare"))
needs_root = pytest.mark.skipif(not ROOTED, reason="needs root, ip, tc, nsenter and unshare")


def vn(*args, timeout=60, **kw):
    return subprocess.run(["bash", VNODES, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def _namespaces():
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in p.stdout.splitlines() if line.strip()}


def _env(d):
    return dict(line.split("=", 1) for line in (Path(d) / "vnodes.env").read_text().split())


@pytest.mark.parametrize("args,msg", [
    (["start", "0", "{d}"], "K must be a whole number >= 1"),
    (["start", "two", "{d}"], "K must be a whole number >= 1"),
    (["start", "2", "{d}", "--rate", "10furlongs"], "rate '10furlongs' is not one tc accepts"),
    (["start", "2", "{d}", "--rate"], "--rate needs a value"),
    (["stop", "{d}"], "was never started"),
    (["bogus"], "usage:"),
])
def test_bad_input_is_one_line_exit_2_nothing_left(tmp_path, args, msg):
    d = tmp_path / "cl"
    before = _namespaces() if ROOTED else set()
    p = vn(*[a.format(d=d) for a in args])
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not d.exists() or not any(d.iterdir()), list(d.iterdir())
    if ROOTED:
        assert _namespaces() == before


def test_not_root_is_skipped_with_exit_0():
    drop = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: cannot drop privileges")
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # a copy of the script in a folder the unprivileged user can read (the clone may be under /root)
    d = Path(tempfile.mkdtemp(prefix="mpidl-vnodes-", dir="/tmp"))
    try:
        os.chmod(d, 0o777)
        script = d / "vnodes.sh"
        shutil.copy(VNODES, script)
        os.chmod(script, 0o755)
        for require, rc in (("0", 0), ("1", 1)):
            p = subprocess.run([*drop, "bash", str(script), "start", "2", str(d / "cl")], capture_output=True,
                               text=True, timeout=60, cwd=d, env=dict(os.environ, MPIDL_REQUIRE_CLUSTER=require))
            assert p.returncode == rc and "SKIPPED: needs root" in p.stdout, (require, p.returncode, p.stdout, p.stderr)
            assert not (d / "cl").exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_root
def test_life_cycle_hostnames_shaping_and_stop_kills_by_pid(tmp_path):
    d = tmp_path / "cl"
    before = _namespaces()
    p = vn("start", "3", d, "--rate", "200mbit")
    assert p.returncode == 0, p.stderr
    try:
        env = _env(d)
        vid = env["VN_ID"]
        made = {f"mpidl-vn{vid}-{i}" for i in ("0", "1", "2", "sw")}
        assert _namespaces() - before == made
        assert (env["VN_K"], env["VN_RATE"], env["VN_RATE_BITS"]) == ("3", "200mbit", "200000000")
        assert env["VN_BURST"] == "50000"           # 2 ms of traffic at 200 Mbit/s
        assert (d / "hostfile").read_text().split() == ["vnode0", "vnode1", "vnode2"]
        for f in ("mpiexec", "agent"):
            assert os.access(d / f, os.X_OK)
        # a node: its own hostname, its address, its /etc/hosts; the machine's stay as they were
        host_before = subprocess.run(["hostname"], capture_output=True, text=True).stdout
        q = subprocess.run([str(d / "agent"), "vnode2", "hostname; ip -o -4 addr show dev eth0; getent hosts vnode0"],
                           capture_output=True, text=True, timeout=30)
        assert q.returncode == 0, q.stderr
        lines = q.stdout.splitlines()
        assert lines[0] == "vnode2" and f"10.201.{vid}.3/24" in lines[1] and lines[2].split()[0] == f"10.201.{vid}.1"
        assert subprocess.run(["hostname"], capture_output=True, text=True).stdout == host_before
        assert f"10.201.{vid}." not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        # both directions of every link shaped
        for i in range(3):
            for ns, dev in ((f"mpidl-vn{vid}-{i}", "eth0"), (f"mpidl-vn{vid}-sw", f"p{i}")):
                qd = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev],
                                    capture_output=True, text=True).stdout
                assert "tbf" in qd and "200Mbit" in qd, (ns, dev, qd)
        # reshape, then unshape
        assert vn("rate", d, "50mbit").returncode == 0 and _env(d)["VN_RATE_BITS"] == "50000000"
        assert _env(d)["VN_BURST"] == "32768"       # 2 ms at 50 Mbit/s is below the 32 KiB floor
        assert vn("rate", d, "unshaped").returncode == 0 and _env(d)["VN_RATE_BITS"] == "0"
        # in use: a second start is refused and changes nothing
        p = vn("start", "2", d)
        assert p.returncode == 2 and "in use" in p.stderr and _env(d)["VN_K"] == "3", p.stderr
        # a process left running on a node (a crashed job's orphan) is killed by stop
        orphan = subprocess.Popen([str(d / "agent"), "vnode1", "exec sleep 600"], start_new_session=True)
        t = time.monotonic()
        while not subprocess.run(["ip", "netns", "pids", f"mpidl-vn{vid}-1"], capture_output=True,
                                 text=True).stdout.strip():
            assert time.monotonic() - t < 20, "the orphan never started"
            time.sleep(0.1)
    finally:
        p = vn("stop", d)
    assert p.returncode == 0, p.stderr
    orphan.wait(timeout=20)
    assert _namespaces() == before
    assert not (d / "vnodes.env").exists() and not (d / "mpiexec").exists()
    p = vn("stop", d)                      # idempotent
    assert p.returncode == 0 and "already stopped" in p.stdout
    p = vn("start", "1", d)                # a stopped DIR can be started again
    assert p.returncode == 0, p.stderr
    assert vn("stop", d).returncode == 0 and _namespaces() == before


@needs_root
def test_mpiexec_wrapper_block_placement_and_mpi_detection(tmp_path):
    d = tmp_path / "cl"
    assert vn("start", "2", d).returncode == 0
    try:
        env = dict(os.environ, MPIDL_VNODES_DRY="1", MPIDL_VNODES_MPI="mpich")
        p = subprocess.run([str(d / "mpiexec"), "-n", "3", sys.executable, "x.py"], capture_output=True, text=True, env=env)
        assert p.returncode == 0 and "-hosts vnode0:2,vnode1:1" in p.stdout and "-iface eth0" in p.stdout, p
        env["MPIDL_VNODES_MPI"] = "openmpi"
        if shutil.which("mpirun.openmpi") or shutil.which("mpiexec.openmpi"):
            p = subprocess.run([str(d / "mpiexec"), "-n", "4", sys.executable, "x.py"], capture_output=True, text=True,
                               env=env)
            assert p.returncode == 0 and "--host vnode0:2,vnode1:2" in p.stdout and "plm_rsh_agent" in p.stdout, p
            assert "-x MPIDL_LINK_RATE" in p.stdout, p.stdout      # Open MPI passes only what -x names
        p = subprocess.run([str(d / "mpiexec"), "python3", "x.py"], capture_output=True, text=True)
        assert p.returncode == 2 and "-n N is required" in p.stderr, p.stderr
        # the ranks see the links' rate (mpidl compare writes it into report.md), and a reshape
        code = "import os, socket; print(socket.gethostname(), os.environ.get('MPIDL_LINK_RATE'))"
        for rate in ("unshaped", "100mbit"):
            if rate != "unshaped":
                assert vn("rate", d, rate).returncode == 0
            p = subprocess.run([str(d / "mpiexec"), "-n", "2", sys.executable, "-c", code], capture_output=True,
                               text=True, timeout=120, cwd=str(tmp_path))
            lines = sorted(p.stdout.split("\n")[:-1])
            assert p.returncode == 0 and len(lines) == 2, (p.stdout, p.stderr)
            assert [ln.split(" ", 1)[0] for ln in lines] == ["vnode0", "vnode1"], lines
            assert all(ln.split(" ", 1)[1].startswith(f"{rate} (emulated nodes") for ln in lines), lines
    finally:
        vn("stop", d)
