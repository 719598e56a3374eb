"""Results rows are durable up to a checkpoint: Recorder.sync, kill -9, resume (serial, issue 10)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np

from mpidl.metrics import Recorder, load_results

ROOT = Path(__file__).resolve().parent.parent

# A child process logs rows 1..40 (sync after step 20, the "checkpoint"), sleeps so the wall
# clock moves, logs rows 21..30 (buffered: flush_every and flush_seconds are large) and kills
# itself with SIGKILL, the way a node dies.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from mpidl.metrics import Recorder
    rec = Recorder(sys.argv[1], None, {"algorithm": "toy"}, flush_every=10**6, flush_seconds=1e9,
                   **({"resume": int(sys.argv[2])} if len(sys.argv) > 2 else {}))
    start = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    for k in range(start + 1, start + 31):
        rec.log("train", k, loss=1.0 / k)
        if k % 5 == 0:
            rec.log("eval", k, test_acc=k / 100.0)
        if k == start + 20:
            time.sleep(0.3)
            print(rec.elapsed(), flush=True)  # a lower bound of the wall time sync records
            rec.sync(k)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _child(path, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    return float(p.stdout.split()[0])


def test_sync_makes_rows_durable_and_resume_continues_wall_time(tmp_path):
    path = tmp_path / "results.h5"
    synced_wall = _child(path)                  # killed after sync(20)
    assert not path.exists() and Path(str(path) + ".tmp").exists()
    d = load_results(path)                      # the crashed run's .tmp
    assert list(d["series"]["train"]["step"]) == list(range(1, 21))
    assert list(d["series"]["eval"]["step"]) == [5, 10, 15, 20]
    # resume from the "checkpoint" at step 20: rows continue, wall time continues from the sync
    rec = Recorder(path, None, {"algorithm": "toy"}, resume=20)
    assert rec.elapsed() >= synced_wall
    for k in range(21, 26):
        rec.log("train", k, loss=1.0 / k)
    rec.close()
    tr = load_results(path)["series"]["train"]
    assert list(tr["step"]) == list(range(1, 26))
    assert np.all(np.diff(tr["wall_time"]) >= 0), tr["wall_time"]
    assert tr["wall_time"][20] >= synced_wall  # the first row after the resume
    assert np.allclose(tr["loss"], 1.0 / np.arange(1, 26))


def test_without_sync_buffered_rows_are_lost(tmp_path):
    """The control: the same crash without sync loses the buffered rows (what issue 10 saw)."""
    path = tmp_path / "results.h5"
    code = CHILD.replace("rec.sync(k)", "pass")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -signal.SIGKILL
    d = load_results(path)
    assert "train" not in d["series"] or len(d["series"]["train"]["step"]) == 0


def test_resume_prefers_a_crashed_tmp_over_an_older_finished_file(tmp_path):
    """Invocation 1 stops cleanly (path), invocation 2 resumes, syncs at 40 and is killed (.tmp):
    invocation 3 must continue from the .tmp, not from invocation 1's older file."""
    path = tmp_path / "results.h5"
    rec = Recorder(path, None, {"algorithm": "toy"})
    for k in range(1, 21):
        rec.log("train", k, loss=1.0 / k)
    rec.close()
    _child(path, 20)                            # steps 21..50, sync at 40, killed
    rec = Recorder(path, None, {"algorithm": "toy"}, resume=40)
    rec.close()
    d = load_results(path)
    assert list(d["series"]["train"]["step"]) == list(range(1, 41))
    assert len(__import__("json").loads(d["attrs"]["resumes"])) == 2


def test_sync_of_a_damaged_tmp_falls_back_to_the_finished_file(tmp_path):
    path = tmp_path / "results.h5"
    rec = Recorder(path, None, {"algorithm": "toy"})
    rec.log("train", 1, loss=1.0)
    rec.close()
    Path(str(path) + ".tmp").write_bytes(b"not hdf5")
    rec = Recorder(path, None, {"algorithm": "toy"}, resume=1)
    rec.close()
    assert list(load_results(path)["series"]["train"]["step"]) == [1]
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "mpidl-results"
