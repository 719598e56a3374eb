"""Datasets, partitions, shard files and the `mpidl shard` command (serial)."""
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from mpidl import data
from mpidl.__main__ import main as cli
from mpidl.errors import MpidlError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# -- fake IDX files ---------------------------------------------------------------
def _idx(path, arr, gz=True):
    head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        Path(path).write_bytes(raw)


def _fake_mnist(folder, n=60, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    x, y = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
    xt, yt = rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10
    sfx = ".gz" if gz else ""
    _idx(folder / f"train-images-idx3-ubyte{sfx}", x, gz)
    _idx(folder / f"train-labels-idx1-ubyte{sfx}", y, gz)
    _idx(folder / f"t10k-images-idx3-ubyte{sfx}", xt, gz)
    _idx(folder / f"t10k-labels-idx1-ubyte{sfx}", yt, gz)
    return x, y, xt, yt


def test_idx_loader_scales_and_shapes(tmp_path):
    x, y, xt, yt = _fake_mnist(tmp_path / "mnist")
    ds = data.load_dataset("mnist", data_dir=tmp_path)  # finds the mnist/ sub-folder
    assert ds.x_train.shape == (60, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert np.array_equal(ds.x_train[:, 0], (x / 255.0).astype(np.float32))
    assert np.array_equal(ds.y_test, yt) and ds.w_true is None
    assert 0.0 <= ds.x_test.min() and ds.x_test.max() <= 1.0


def test_idx_loader_plain_files_and_env(tmp_path, monkeypatch):
    _fake_mnist(tmp_path, gz=False)
    monkeypatch.setenv("MPIDL_DATA", str(tmp_path))
    assert data.load_dataset("mnist").x_train.shape == (60, 1, 28, 28)


def test_missing_files_name_path_and_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv("MPIDL_DATA", raising=False)
    with pytest.raises(MpidlError, match="apt-get install dataset-fashion-mnist") as e:
        data.load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    _fake_mnist(tmp_path / "m")
    os.remove(tmp_path / "m" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(MpidlError, match="t10k-labels-idx1-ubyte.gz not found"):
        data.load_dataset("mnist", data_dir=tmp_path / "m")


def test_truncated_and_bogus_files(tmp_path):
    _fake_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    with gzip.open(p, "wb") as f:  # valid gzip, short payload
        f.write(raw[:-100])
    with pytest.raises(MpidlError, match="truncated") as e:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert str(p) in str(e.value)
    p.write_bytes(p.read_bytes()[:200])  # cut gzip stream
    with pytest.raises(MpidlError, match="cannot read"):
        data.load_dataset("mnist", data_dir=tmp_path)
    with gzip.open(p, "wb") as f:
        f.write(b"PK\x03\x04 not idx at all")
    with pytest.raises(MpidlError, match="not an IDX file"):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_unknown_dataset_and_options():
    with pytest.raises(MpidlError, match="unknown dataset"):
        data.load_dataset("cifar-1000")
    with pytest.raises(MpidlError, match="unknown options"):
        data.load_dataset("synthetic-lsq", bogus=1)


def test_synthetic_problems_have_planted_models():
    lsq = data.load_dataset("synthetic-lsq", seed=3, n=400, dim=5, noise=0.01)
    assert lsq.x_train.shape == (400, 5) and lsq.y_train.dtype == np.float32 and lsq.num_classes == 0
    w, *_ = np.linalg.lstsq(lsq.x_train.astype(np.float64), lsq.y_train.astype(np.float64), rcond=None)
    assert np.allclose(w, lsq.w_true, atol=0.01)
    log = data.load_dataset("synthetic-logistic", seed=3, n=2000, dim=4)
    assert set(np.unique(log.y_train)) == {0, 1} and log.num_classes == 2 and log.w_true.shape == (4,)
    agree = ((log.x_test @ log.w_true > 0) == (log.y_test == 1)).mean()
    assert agree > 0.7
    again = data.load_dataset("synthetic-logistic", seed=3, n=2000, dim=4)
    assert np.array_equal(again.x_train, log.x_train) and np.array_equal(again.y_train, log.y_train)


def test_digits():
    pytest.importorskip("sklearn")
    ds = data.load_dataset("digits", seed=1)
    assert ds.x_train.shape[1:] == (1, 8, 8) and len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.x_train.max() <= 1.0 and ds.num_classes == 10


# -- partitions ---------------------------------------------------------------
def _labels(n=500, k=10, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


@pytest.mark.parametrize("scheme", data.SCHEMES)
@pytest.mark.parametrize("agents", [1, 2, 3, 7, 10, 13])
def test_partition_disjoint_covering_nonempty(scheme, agents):
    y = _labels()
    parts = data.partition(y, agents, scheme, seed=4, alpha=0.5)
    assert len(parts) == agents and all(len(p) > 0 for p in parts)
    allix = np.concatenate(parts)
    assert np.array_equal(np.sort(allix), np.arange(len(y)))
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates
    again = data.partition(y, agents, scheme, seed=4, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_partition_schemes_shape():
    y = _labels(1000)
    iid = data.partition(y, 4, "iid")
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    assert not all(np.array_equal(a, b) for a, b in zip(iid, data.partition(y, 4, "iid", seed=1)))
    assert np.array_equal(data.partition(y, 4, "contiguous")[0], np.arange(250))
    byc = data.partition(y, 5, "by-class")
    assert [sorted(set(y[p])) for p in byc] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    many = data.partition(y, 20, "by-class")  # more agents than classes: one class each
    assert all(len(set(y[p])) == 1 for p in many)
    skew = data.partition(y, 4, "dirichlet", alpha=0.05, seed=2)
    flat = data.partition(y, 4, "dirichlet", alpha=1000.0, seed=2)
    frac = lambda ps: np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in ps])
    assert frac(skew) > 0.3 > 0.15 > frac(flat)


def test_partition_errors():
    with pytest.raises(MpidlError, match="cannot give each of 11 agents"):
        data.partition(np.arange(10) % 2, 11)
    with pytest.raises(MpidlError, match="unknown scheme"):
        data.partition(_labels(), 2, "random")
    with pytest.raises(MpidlError, match="integer class labels"):
        data.partition(np.zeros(10, dtype=np.float32), 2, "dirichlet")
    with pytest.raises(MpidlError, match="alpha must be > 0"):
        data.partition(_labels(), 2, "dirichlet", alpha=0)
    with pytest.raises(MpidlError, match="raise alpha"):
        data.partition(_labels(30), 10, "dirichlet", alpha=0.001, min_size=3, max_tries=5)
    with pytest.raises(MpidlError, match="positive integer"):
        data.partition(_labels(), 0)
    with pytest.raises(MpidlError, match="class 1 has 1 samples"):
        data.partition(np.array([0, 0, 0, 0, 1]), 4, "by-class")


# -- shard files ----------------------------------------------------------------
@pytest.fixture
def small():
    return data.load_dataset("synthetic-logistic", seed=1, n=300, n_test=50, dim=6)


def test_shard_round_trip(tmp_path, small):
    parts = data.partition(small.y_train, 3, "dirichlet", seed=2, alpha=0.3)
    path = tmp_path / "s.h5"
    data.write_shards(path, small, parts, seed=2, partition="dirichlet", alpha=0.3, note="hello")
    for r in range(3):
        s = data.read_shard(path, r, 3)
        assert np.array_equal(s.x, small.x_train[parts[r]]) and s.x.dtype == np.float32
        assert np.array_equal(s.y, small.y_train[parts[r]]) and s.y.dtype == np.int64
        assert np.array_equal(s.x_test, small.x_test) and np.array_equal(s.y_test, small.y_test)
        assert np.array_equal(s.indices, parts[r]) and np.array_equal(s.w_true, small.w_true)
        assert s.num_classes == 2 and s.input_shape == (6,) and s.rank == r
        assert s.attrs["partition"] == "dirichlet" and s.attrs["note"] == "hello" and s.attrs["seed"] == 2
    info = data.shard_info(path)
    assert info["sizes"] == [len(p) for p in parts]
    assert np.array_equal(info["class_histogram"].sum(1), info["sizes"])
    assert np.array_equal(info["class_histogram"].sum(0), np.bincount(small.y_train))


def test_shard_errors(tmp_path, small):
    parts = data.partition(small.y_train, 2)
    path = tmp_path / "s.h5"
    data.write_shards(path, small, parts)
    with pytest.raises(MpidlError, match="holds 2 agents but the job has 4 ranks"):
        data.read_shard(path, 0, 4)
    with pytest.raises(MpidlError, match="not found"):
        data.read_shard(tmp_path / "none.h5", 0, 2)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5" * 10)
    with pytest.raises(MpidlError, match="cannot open shard file"):
        data.read_shard(tmp_path / "junk.h5", 0, 2)
    with pytest.raises(MpidlError, match="overlap"):
        data.write_shards(tmp_path / "o.h5", small, [parts[0], parts[0][:3]])
    with pytest.raises(MpidlError, match="non-empty"):
        data.write_shards(tmp_path / "o.h5", small, [parts[0], np.array([], dtype=np.int64)])
    assert not (tmp_path / "o.h5").exists()


def test_interrupted_shard_write_keeps_old_file(tmp_path, small, monkeypatch):
    path = tmp_path / "s.h5"
    data.write_shards(path, small, data.partition(small.y_train, 2))
    before = path.read_bytes()
    import h5py
    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (injected)")
        return real(self, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(OSError, match="injected"):
        data.write_shards(path, small, data.partition(small.y_train, 3))
    assert path.read_bytes() == before and not Path(str(path) + ".tmp").exists()


def test_load_agent_data_matches_shards(tmp_path):
    kw = dict(n=200, dim=3)
    ds = data.load_dataset("synthetic-logistic", seed=5, **kw)
    parts = data.partition(ds.y_train, 4, "by-class", seed=5)
    path = tmp_path / "s.h5"
    data.write_shards(path, ds, parts, seed=5, partition="by-class", dataset_options=kw)
    for r in range(4):
        a = data.load_agent_data("synthetic-logistic", None, "by-class", 0.5, 5, r, 4, **kw)
        b = data.load_agent_data("synthetic-logistic", None, "by-class", 0.5, 5, r, 4, shards=str(path))
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and np.array_equal(a.indices, b.indices)
        assert np.array_equal(a.w_true, ds.w_true) and len(a) == len(parts[r])
    with pytest.raises(MpidlError, match="outside a world"):
        data.load_agent_data("synthetic-lsq", rank=4, world_size=4)


def test_idx_agent_data_fast_path_equals_full_load(tmp_path):
    _fake_mnist(tmp_path, n=80)
    ds = data.load_dataset("mnist", data_dir=tmp_path)
    parts = data.partition(ds.y_train, 3, "dirichlet", seed=1, alpha=1.0)
    for r in range(3):
        s = data.load_agent_data("mnist", tmp_path, "dirichlet", 1.0, 1, r, 3)
        assert np.array_equal(s.x, ds.x_train[parts[r]]) and np.array_equal(s.y, ds.y_train[parts[r]])
        assert np.array_equal(s.x_test, ds.x_test) and s.num_classes == 10


def test_shard_command(tmp_path, capsys):
    out = tmp_path / "s.h5"
    args = ["shard", "--dataset", "synthetic-logistic", "--n", "120", "--dim", "4", "--agents", "3",
            "--partition", "dirichlet", "--alpha", "0.5", "--out", str(out)]
    assert cli(args) == 0
    assert cli(args) == 2 and "--force" in capsys.readouterr().err  # no silent overwrite
    assert cli(args + ["--force"]) == 0
    capsys.readouterr()
    assert cli(["shard", "--info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 agents" in text and "dirichlet" in text and "samples per class" in text
    assert cli(["shard", "--agents", "2", "--out", str(tmp_path / "x.h5"), "--dataset", "mnist",
                "--data-dir", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.skipif(not (FMNIST / "train-labels-idx1-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist(tmp_path):
    ds = data.load_dataset("fashion-mnist", data_dir=FMNIST)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    s = data.load_agent_data("fashion-mnist", FMNIST, "by-class", 0.5, 0, 2, 5)
    assert sorted(set(s.y.tolist())) == [4, 5] and len(s) == 12000
