"""Checkpoint details a mutation run of mpidl/checkpoint.py found unchecked (docs/testing.md):
the manifest's contents, damage that keeps the file size, the listing's labels, the step bound,
the default ``keep``, and the numpy generator in the RNG state.  Serial and fast."""
import hashlib
import json
import os
import platform

import numpy as np
import pytest

from mpidl import checkpoint as ck
from mpidl.checkpoint import CheckpointError, CheckpointStore


def _state():
    return {"x": np.arange(6.0), "k": np.int64(3)}


def test_manifest_records_meta_versions_and_files(tmp_path):
    meta = {"algorithm": "cdsgd", "s": {3, 1, 2}, "f": np.float32(1.5), "a": np.arange(3), "nan": float("nan")}
    path = CheckpointStore(tmp_path).save(4, _state(), meta)
    with open(os.path.join(path, "manifest.json")) as f:
        man = json.load(f)                              # plain json, not the production reader
    assert man["format"] == "mpidl-checkpoint" and man["step"] == 4 and man["world_size"] == 1
    assert man["algorithm"] == "cdsgd"
    m = man["meta"]
    assert m["s"] == [1, 2, 3] and m["f"] == 1.5 and m["a"] == [0, 1, 2] and np.isnan(m["nan"])
    assert man["versions"]["python"] == platform.python_version()
    assert man["versions"]["numpy"] == np.__version__
    import zlib
    crcs = []
    for step in range(4, 12):                           # a few files, so some CRC is odd
        path = CheckpointStore(tmp_path, keep=None).save(step, {"x": np.arange(6.0) + step})
        with open(os.path.join(path, "manifest.json")) as f:
            [fe] = json.load(f)["files"]
        fp = os.path.join(path, fe["name"])
        with open(fp, "rb") as f:
            data = f.read()
        assert fe["bytes"] == len(data) == os.path.getsize(fp) and fe["crc32"] == zlib.crc32(data)
        crcs.append(fe["crc32"])
    assert any(c % 2 for c in crcs) and len(set(crcs)) == len(crcs), crcs


def test_damage_that_keeps_the_size_is_found(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.save(1, _state())
    assert ck.verify_checkpoint(path) == []
    fp = os.path.join(path, "rank_00000.h5")
    size = os.path.getsize(fp)
    with open(fp, "r+b") as f:                          # flip one byte of the last one
        f.seek(size - 1)
        b = f.read(1)
        f.seek(size - 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert os.path.getsize(fp) == size
    problems = ck.verify_checkpoint(path)
    assert len(problems) == 1 and "is damaged" in problems[0] and f"{size} bytes" in problems[0]


@pytest.mark.parametrize("man", [{"format": "mpidl-checkpoint-2", "step": 1}, ["mpidl-checkpoint"], {"step": 1}])
def test_a_foreign_manifest_is_rejected(tmp_path, man):
    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="is not an mpidl checkpoint manifest"):
        ck.read_manifest(d)
    [entry] = ck.list_checkpoints(tmp_path)
    assert not entry["complete"] and "is not an mpidl checkpoint manifest" in entry["problem"]


def test_listing_labels_leftover_folders(tmp_path):
    for name in ("a_dir", "step_x", "zz"):              # not checkpoints: skipped, wherever they are listed
        (tmp_path / name).mkdir()
    (tmp_path / "step_00000009").write_text("a file, not a folder")
    CheckpointStore(tmp_path).save(2, _state())
    (tmp_path / "step_00000003.tmp").mkdir()
    (tmp_path / "step_00000001.old").mkdir()
    got = {(e["step"], e["complete"], e["problem"]) for e in ck.list_checkpoints(tmp_path)}
    assert got == {(1, False, "replaced, not yet deleted"), (2, True, None), (3, False, "interrupted save")}


def test_verify_reports_every_bad_file(tmp_path):
    """A damaged or missing file does not hide the next rank's problem."""
    path = CheckpointStore(tmp_path).save(1, _state())
    mp = os.path.join(path, "manifest.json")
    with open(mp) as f:
        man = json.load(f)
    fe = man["files"][0]
    man["files"] = [fe, {**fe, "name": "rank_00001.h5"}, {**fe, "name": "rank_00002.h5"}]
    with open(mp, "w") as f:
        json.dump(man, f)
    problems = ck.verify_checkpoint(path)
    assert [p.split(":")[0] for p in problems] == ["rank 1", "rank 2"] and all("missing" in p for p in problems)
    man["files"] = [{**fe, "crc32": fe["crc32"] ^ 1}, {**fe, "name": "rank_00001.h5"}]
    with open(mp, "w") as f:
        json.dump(man, f)
    problems = ck.verify_checkpoint(path)
    assert len(problems) == 2 and "is damaged" in problems[0] and "missing" in problems[1], problems


def test_step_zero_is_a_step_and_negative_is_an_error(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(0, _state())
    assert store.steps() == [0]
    with pytest.raises(CheckpointError, match="checkpoint step must be >= 0, got -1"):
        store.save(-1, _state())
    assert store.steps() == [0]


def test_default_keep_is_the_documented_three(tmp_path):
    store = CheckpointStore(tmp_path)           # docs/checkpoints.md: keep=3, files fsynced
    assert store.fsync is True
    for s in range(1, 6):
        store.save(s, _state())
    assert store.steps() == [3, 4, 5]


def test_topology_digest_is_a_short_hash_of_shape_and_weights():
    class Topo:
        def __init__(self, w):
            self.weights = w
    w = np.full((2, 2), 0.5)
    d = ck.topology_digest(Topo(w))
    want = hashlib.sha256(repr((2, 2)).encode() + w.astype(np.float64).tobytes()).hexdigest()[:16]
    assert d == want and len(d) == 16
    assert ck.topology_digest(Topo(w.reshape(4, 1))) != d        # same bytes, other shape
    assert ck.topology_digest(w.astype(np.float32)) == d           # a plain matrix, any float dtype
    assert ck.topology_digest(None) is None


def test_rng_state_carries_the_generator(tmp_path):
    g = np.random.default_rng(5)
    g.random(3)
    st = ck.rng_state(g)
    want = g.random(4)
    g2 = np.random.default_rng(99)
    ck.set_rng_state(st, g2)
    assert np.array_equal(g2.random(4), want)
    with pytest.raises(CheckpointError, match="holds no generator state"):
        ck.set_rng_state(ck.rng_state(), np.random.default_rng(1))


def test_one_process_allreduce_returns_a_copy():
    """The one-process stand-in behaves like MPI: the result is not the caller's buffer."""
    a = np.ones(3)
    b = ck._Solo().allreduce(a)
    b += 1
    assert np.array_equal(a, np.ones(3))


def test_guard_propagates_errors_and_announces_once(caplog):
    import logging
    import signal
    with pytest.raises(ValueError, match="inside"):
        with ck.PreemptionGuard():
            raise ValueError("inside the guard")
    with caplog.at_level(logging.INFO, logger="mpidl"):
        with ck.PreemptionGuard() as g:
            assert not g.should_stop()
            g.request(signal.SIGTERM)
            assert g.should_stop() and g.should_stop()
    said = [r.getMessage() for r in caplog.records if "preemption requested" in r.getMessage()]
    assert said == ["preemption requested (SIGTERM): saving a checkpoint and stopping"], said


def test_guard_takes_over_the_last_early_signal():
    import signal
    ck._EARLY[:] = [signal.SIGUSR1, signal.SIGTERM]
    try:
        with ck.PreemptionGuard() as g:
            assert g.requested and g.signum == signal.SIGTERM and ck._EARLY == []
    finally:
        ck._EARLY.clear()
