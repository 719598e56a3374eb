"""CheckpointStore (one process), crash safety, RNG state, preemption under mpiexec, `mpidl ckpt`."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpidl import checkpoint as C
from mpidl import h5state as H
from mpidl.__main__ import main as cli
from mpidl.checkpoint import CheckpointError, CheckpointStore, PreemptionGuard, rng_state, set_rng_state

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "algo": {"x": rng.standard_normal(17).astype(np.float32), "v": rng.standard_normal((3, 4)),
                 "k": 12, "lr": 0.1 + seed, "nesterov": True, "name": "cdsgd", "pi": None,
                 "nan": np.array([np.nan, -0.0, np.inf]), "empty": np.zeros((0, 2), np.int16),
                 "big": 2 ** 90 + seed, "hist": [1, 2.5, "a"], "shape": (2, (3, 4)), "blob": b"\x00\xff",
                 "f32": np.float32(1.5), "mask": rng.random(5) > 0.5, "c": np.array([1 + 2j])},
        "rng": {"numpy": rng.bit_generator.state},
        "step": 12,
    }


def _equal(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (np.ndarray, np.generic)):
        return (type(a) is type(b) and a.dtype == b.dtype and np.shape(a) == np.shape(b)
                and np.asarray(a).tobytes() == np.asarray(b).tobytes())
    return type(a) is type(b) and a == b


def test_round_trip_bit_exact_with_types(tmp_path):
    st = _state()
    store = CheckpointStore(tmp_path, keep=None)
    path = store.save(12, st, {"algorithm": "cdsgd", "config": {"lr": np.float64(0.1)}})
    assert Path(path).name == "step_00000012" and store.latest() == 12
    got, meta = store.load(12, like=st, expect={"algorithm": "cdsgd"})
    assert _equal(st, got)
    assert meta == {"algorithm": "cdsgd", "config": {"lr": 0.1}}
    man = store.manifest(12)
    assert man["world_size"] == 1 and man["step"] == 12 and man["versions"]["mpidl"]
    assert man["files"][0]["name"] == "rank_00000.h5"


def test_load_in_place_reads_into_like_arrays(tmp_path):
    """``in_place``: matching arrays are filled, not copied; the rest are read as usual."""
    st = _state()
    store = CheckpointStore(tmp_path, keep=None)
    store.save(12, st, {"algorithm": "cdsgd"})
    like = _state(seed=1)                              # same names, shapes, dtypes; other values
    like["algo"]["v"] = np.zeros((4, 3)).T             # F-ordered: not read in place
    x, v, nan = like["algo"]["x"], like["algo"]["v"], like["algo"]["nan"]
    got, _ = store.load(12, like=like, in_place=True)
    assert _equal(st, got)
    assert got["algo"]["x"] is x and got["algo"]["nan"] is nan
    assert got["algo"]["v"] is not v and not v.any()
    assert x.tobytes() == st["algo"]["x"].tobytes()
    fresh = _state(seed=1)
    got, _ = store.load(12, like=fresh)                # default: like is left alone
    assert got["algo"]["x"] is not fresh["algo"]["x"] and _equal(fresh, _state(seed=1))
    bad = _state(seed=1)
    bad["algo"]["x"] = np.zeros(18, np.float32)
    with pytest.raises(CheckpointError, match=r"algo/x has shape \(17,\) float32, this run has \(18,\)"):
        store.load(12, like=bad, in_place=True)


def test_torch_tensors_and_rng_state(tmp_path):
    torch = pytest.importorskip("torch")
    gen = np.random.default_rng(3)
    np.random.seed(7)
    torch.manual_seed(9)
    st = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3), "rng": rng_state(gen)}
    store = CheckpointStore(tmp_path)
    store.save(1, st)
    expect = (gen.random(3), np.random.random(3), torch.rand(3))
    gen2 = np.random.default_rng(999)
    np.random.seed(0)
    torch.manual_seed(0)
    got, _ = store.load(1, like=st)
    assert torch.equal(got["w"], st["w"])
    set_rng_state(got["rng"], gen2)
    again = (gen2.random(3), np.random.random(3), torch.rand(3))
    assert np.array_equal(expect[0], again[0]) and np.array_equal(expect[1], again[1])
    assert torch.equal(expect[2], again[2])


def test_keep_newest_and_same_step_twice(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for s in (5, 10, 15):
        store.save(s, {"s": s})
    assert store.steps() == [10, 15]
    store.save(15, {"s": 99})  # again: replaces it
    assert store.steps() == [10, 15] and store.load(15)[0]["s"] == 99
    assert store.load()[0]["s"] == 99  # step=None: newest
    assert sorted(os.listdir(tmp_path)) == ["step_00000010", "step_00000015"]


@pytest.mark.parametrize("where", ["rank file", "manifest", "rename"])
def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch, where):
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1))
    if where == "rank file":  # an exception half-way through writing the HDF5 file
        real = H._encode
        calls = {"n": 0}

        def boom(v, name):
            calls["n"] += 1
            if calls["n"] == 6:
                raise OSError("disk full (injected)")
            return real(v, name)
        monkeypatch.setattr(H, "_encode", boom)
    elif where == "manifest":
        monkeypatch.setattr(C.json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("quota (injected)")))
    else:
        monkeypatch.setattr(C.os, "rename", lambda *a: (_ for _ in ()).throw(OSError("EIO (injected)")))
    with pytest.raises(CheckpointError, match="injected"):
        store.save(2, _state(2))
    monkeypatch.undo()
    assert store.latest() == 1
    got, _ = store.load(1, like=_state(1))
    assert _equal(got, _state(1))
    store.save(3, _state(3))  # leftovers are cleaned by the next save
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000003"]


KILL_SCRIPT = r"""
import os, signal, sys
import numpy as np
from mpidl import checkpoint as C
from mpidl import h5state as H
store = C.CheckpointStore(sys.argv[1])
store.save(1, {"x": np.arange(3.0)})
point = sys.argv[2]
if point == "write":
    real = H._encode
    n = [0]
    def enc(v, name):
        n[0] += 1
        if n[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(v, name)
    H._encode = enc
elif point == "manifest":
    real_replace = C.os.replace
    def rep(a, b):
        if b.endswith("manifest.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(a, b)
    C.os.replace = rep
else:
    real_rename = C.os.rename
    def ren(a, b):
        if a.endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(a, b)
    C.os.rename = ren
store.save(2, {"x": np.arange(3.0) + 1, "y": np.ones(100000), "z": 1, "w": 2})
"""


@pytest.mark.parametrize("point", ["write", "manifest", "rename"])
def test_sigkill_mid_save_leaves_previous_loadable(tmp_path, point):
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), point], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (tmp_path / "step_00000002.tmp").is_dir()
    store = CheckpointStore(tmp_path)
    assert store.latest() == 1
    assert np.array_equal(store.load(None)[0]["x"], np.arange(3.0))
    assert [e["complete"] for e in C.list_checkpoints(tmp_path)] == [True, False]


def test_mismatch_errors(tmp_path):
    st = _state()
    store = CheckpointStore(tmp_path)
    store.save(4, st, {"algorithm": "cdsgd", "topology_digest": "abc"})
    with pytest.raises(CheckpointError, match="algorithm is 'cdsgd' but this run has 'fedavg'"):
        store.load(4, expect={"algorithm": "fedavg"})
    with pytest.raises(CheckpointError, match="topology is 'abc'"):
        store.load(4, expect={"topology": "xyz"})
    with pytest.raises(CheckpointError, match="<not recorded>"):
        store.load(4, expect={"seed": 1})
    bad = _state()
    bad["algo"]["x"] = np.zeros(18, np.float32)
    with pytest.raises(CheckpointError, match=r"algo/x has shape \(17,\) float32, this run has \(18,\)"):
        store.load(4, like=bad)
    bad = _state()
    bad["algo"]["v"] = bad["algo"]["v"].astype(np.float32)
    with pytest.raises(CheckpointError, match="float64, this run has"):
        store.load(4, like=bad)
    bad = _state()
    bad["opt"] = {"m": np.zeros(3)}
    with pytest.raises(CheckpointError, match=r"lacks \['opt'\]"):
        store.load(4, like=bad)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        CheckpointStore(tmp_path / "empty").load()
    man = json.loads((tmp_path / "step_00000004" / "manifest.json").read_text())
    man["world_size"] = 3
    (tmp_path / "step_00000004" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="written by 3 ranks but this job has 1"):
        store.load(4)


def test_bad_state_is_an_error_and_writes_nothing(tmp_path):
    store = CheckpointStore(tmp_path)
    for bad, msg in [({"o": object()}, "has type object"), ({"a/b": 1}, "without '/'"),
                     ({"s": np.array(["a"])}, "dtype <U1"), ({"l": [object()]}, "JSON-able")]:
        with pytest.raises(CheckpointError, match=msg):
            store.save(1, bad)
    with pytest.raises(CheckpointError, match="meta is not JSON-able"):
        store.save(1, {}, {"x": object()})
    assert store.latest() is None and os.listdir(tmp_path) == []


def test_corruption_is_detected(tmp_path):
    store = CheckpointStore(tmp_path, keep=None)
    store.save(1, _state())
    store.save(2, _state())
    f = tmp_path / "step_00000002" / "rank_00000.h5"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is damaged"):
        store.load(2)
    f.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        store.load(2)
    (tmp_path / "step_00000002" / "manifest.json").write_text("{not json")
    assert store.latest() == 1  # an unreadable manifest is not a complete checkpoint
    with pytest.raises(CheckpointError, match="unreadable"):
        store.load(2)


def test_ckpt_command(tmp_path, capsys):
    store = CheckpointStore(tmp_path, keep=None)
    store.save(3, {"x": np.ones(3)}, {"algorithm": "toy"})
    store.save(7, {"x": np.ones(3)}, {"algorithm": "toy"})
    (tmp_path / "step_00000009.tmp").mkdir()
    assert cli(["ckpt", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "partial" in out and "newest complete: step 7" in out
    assert cli(["ckpt", str(tmp_path), "--info"]) == 0
    assert '"step": 7' in capsys.readouterr().out
    assert cli(["ckpt", str(tmp_path), "--verify"]) == 0
    assert capsys.readouterr().out.count("ok") == 2
    f = tmp_path / "step_00000003" / "rank_00000.h5"
    f.write_bytes(f.read_bytes()[:-10])
    assert cli(["ckpt", str(tmp_path), "--verify"]) == 2
    cap = capsys.readouterr()
    assert "DAMAGED" in cap.out and "1 of 2" in cap.err
    assert cli(["ckpt", str(tmp_path / "none")]) == 2


def test_preemption_guard_local():
    with PreemptionGuard() as g:
        assert not g.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert g.requested and g.should_stop() and g.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


# -- under mpiexec ----------------------------------------------------------------
def _mpiexec():
    from test_mpi_suite import mpiexec
    return mpiexec()


def _launch(root, steps, resume=False, n=2):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [*_mpiexec(), "-n", str(n), sys.executable, str(TESTS / "mpi" / "preempt_job.py"), str(root), str(steps)]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"job hung\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


def _ready(root, n, proc, timeout=120):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if all((root / f"ready_{r}").exists() and (root / f"ready_{r}").read_text() for r in range(n)):
            return [int((root / f"ready_{r}").read_text()) for r in range(n)]
        if proc.poll() is not None:
            pytest.fail(f"job ended early: {proc.communicate()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("job never became ready")


def test_signal_to_one_rank_saves_everywhere_and_resume_is_exact(tmp_path):
    """SIGUSR1 to rank 1 only: both ranks agree, save, exit 0; resuming == never stopping."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _launch(run, 100000)
    pids = _ready(run, 2, proc)
    os.kill(pids[1], signal.SIGUSR1)
    rc, out, err = _wait(proc)
    assert rc == 0, err
    stopped = {(run / f"stopped_{r}").read_text() for r in range(2)}
    assert len(stopped) == 1, stopped
    step = int(stopped.pop())
    assert CheckpointStore(run / "ckpt").latest() == step
    assert C.read_manifest(run / "ckpt" / f"step_{step:08d}")["world_size"] == 2
    # resume to step + 4 and compare with an uninterrupted run of step + 4 steps
    rc, out, err = _wait(_launch(run, step + 4, resume=True))
    assert rc == 0, err
    ref = tmp_path / "ref"
    ref.mkdir()
    rc, out, err = _wait(_launch(ref, step + 4))
    assert rc == 0, err
    for r in range(2):
        a, b = np.load(run / f"final_{r}.npy"), np.load(ref / f"final_{r}.npy")
        assert a.tobytes() == b.tobytes(), (r, a, b)


def _open_mpi_launcher():
    out = subprocess.run([*_mpiexec(), "--version"], capture_output=True, text=True, timeout=60)
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def test_sigterm_to_mpiexec_saves_and_exits_zero(tmp_path):
    # MPICH's mpiexec forwards SIGTERM to the ranks; Open MPI's answers SIGTERM by killing the
    # job and forwards SIGUSR1 instead (docs/clusters.md), so that is what it gets
    sig = signal.SIGUSR1 if _open_mpi_launcher() else signal.SIGTERM
    proc = _launch(tmp_path, 100000)
    _ready(tmp_path, 2, proc)
    os.kill(proc.pid, sig)  # what Slurm does to the job step; mpiexec forwards it
    rc, out, err = _wait(proc)
    assert rc == 0, err
    step = int((tmp_path / "stopped_0").read_text())
    assert CheckpointStore(tmp_path / "ckpt").latest() == step
    assert not C.verify_checkpoint(tmp_path / "ckpt" / f"step_{step:08d}")
