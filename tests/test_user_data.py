"""Your model, your data (issue 20): data files, lazy HDF5 rows, CIFAR folders, augmentation,
model factories, and the CLI's one-line errors for each kind of bad input."""
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from mpidl import config as C
from mpidl.data import load_agent_data, load_dataset
from mpidl.errors import MpidlError
from mpidl.models import check_output, make_model, model_units, resolve_factory
from mpidl.sources import Rows, augment_batch, fingerprint, open_path, read_cifar, register_arrays
from test_cli import PER_RANK
from test_mpi_suite import mpiexec

ROOT = Path(__file__).resolve().parent.parent


def _arrays(n=300, nt=80, d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, c))
    x = rng.standard_normal((n + nt, d)).astype(np.float32)
    y = np.argmax(x @ w, 1).astype(np.int64)
    return dict(x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])


def _write_h5(path, arrs, chunk=16, **attrs):
    with h5py.File(path, "w") as f:
        for k, v in arrs.items():
            f.create_dataset(k, data=v, chunks=((chunk,) + v.shape[1:]) if v.ndim > 1 else None)
        f.attrs.update(attrs)
    return path


# -- sources --------------------------------------------------------------------
def test_rows_read_any_order_and_repeats_like_numpy(tmp_path):
    a = _arrays()
    p = _write_h5(tmp_path / "d.h5", a)
    src = open_path(p)
    assert isinstance(src.x_train, Rows) and src.x_train.shape == a["x_train"].shape
    idx = np.array([5, 3, 3, 299, 0, 17])
    np.testing.assert_array_equal(src.x_train[idx], a["x_train"][idx])
    view = src.x_train.view(np.array([10, 20, 30, 40]))
    np.testing.assert_array_equal(np.asarray(view[1:3]), a["x_train"][[20, 30]])
    np.testing.assert_array_equal(view[np.array([3, 0])], a["x_train"][[40, 10]])
    np.testing.assert_array_equal(np.asarray(src.x_test[2::3]), a["x_test"][2::3])
    np.testing.assert_array_equal(src.y_train, a["y_train"])
    assert src.num_classes == 3 and src.input_shape == (6,)


@pytest.mark.parametrize("scheme", ["iid", "contiguous", "by-class", "dirichlet"])
def test_npz_and_h5_shards_hold_the_same_rows(tmp_path, scheme):
    a = _arrays()
    np.savez(tmp_path / "d.npz", **a)
    _write_h5(tmp_path / "d.h5", a)
    for rank in range(3):
        s1 = load_agent_data(path=str(tmp_path / "d.npz"), partition=scheme, seed=4, rank=rank, world_size=3)
        s2 = load_agent_data(path=str(tmp_path / "d.h5"), partition=scheme, seed=4, rank=rank, world_size=3)
        np.testing.assert_array_equal(s1.indices, s2.indices)
        np.testing.assert_array_equal(np.asarray(s1.x), np.asarray(s2.x))
        np.testing.assert_array_equal(s1.x, a["x_train"][s1.indices])      # independent: the file's rows
        np.testing.assert_array_equal(s1.y, a["y_train"][s1.indices])
        assert isinstance(s2.x, Rows) and s1.num_classes == s2.num_classes == 3


def test_regression_targets_and_image_shapes(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 2, 4, 4)).astype(np.float32)
    y = rng.standard_normal(50).astype(np.float32)
    np.savez(tmp_path / "r.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    src = open_path(tmp_path / "r.npz")
    assert src.num_classes == 0 and src.input_shape == (2, 4, 4) and src.y_train.dtype == np.float32
    ds = load_dataset("", path=str(tmp_path / "r.npz"))
    assert ds.x_train.shape == (40, 2, 4, 4) and ds.num_classes == 0


def test_memory_source_and_fingerprint(tmp_path):
    a = _arrays()
    key = register_arrays(*a.values())
    assert key == register_arrays(*a.values()) and key.startswith("memory:")
    np.testing.assert_array_equal(open_path(key).x_train, a["x_train"])
    np.savez(tmp_path / "d.npz", **a)
    fp = fingerprint(tmp_path / "d.npz")
    assert fp["data_bytes"] == os.path.getsize(tmp_path / "d.npz") and len(fp["data_sha256_head"]) == 64


# -- CIFAR ------------------------------------------------------------------------
def write_cifar(folder: Path, kind="cifar10", per_file=40, seed=0):
    """A CIFAR-format folder of random images: the python version's pickled dicts."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        sub, names, key, k = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], \
            b"labels", 10
    else:
        sub, names, key, k = "cifar-100-python", ["train", "test"], b"fine_labels", 100
    d = folder / sub
    d.mkdir(parents=True)
    out = {}
    for name in names:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, k, per_file)]
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)
        out[name] = (data, labels)
    return out


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_folder_loads_and_normalises_per_channel(tmp_path, kind):
    files = write_cifar(tmp_path, kind)
    train = [n for n in files if n not in ("test_batch", "test")]
    u8 = np.concatenate([files[n][0] for n in train]).reshape(-1, 3, 32, 32)
    ds = load_dataset(kind, str(tmp_path))
    assert ds.x_train.shape == (len(u8), 3, 32, 32) and ds.input_shape == (3, 32, 32)
    assert ds.num_classes == (10 if kind == "cifar10" else 100)
    np.testing.assert_array_equal(ds.y_train, np.concatenate([files[n][1] for n in train]))
    f = u8.astype(np.float64) / 255.0       # independent: per-channel statistics of the training images
    mean, std = f.mean(axis=(0, 2, 3)), f.std(axis=(0, 2, 3))
    np.testing.assert_allclose(ds.x_train, (f - mean[None, :, None, None]) / std[None, :, None, None], atol=1e-5)
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    shard = load_agent_data(kind, str(tmp_path), "iid", rank=1, world_size=2)
    np.testing.assert_allclose(shard.x, ds.x_train[shard.indices], atol=1e-6)


def test_cifar_missing_files_name_what_to_put_where(tmp_path):
    with pytest.raises(MpidlError) as e:
        read_cifar("cifar10", str(tmp_path))
    msg = str(e.value)
    assert "data_batch_1" in msg and "test_batch" in msg and str(tmp_path) in msg and "data_dir" in msg
    with pytest.raises(MpidlError, match="fine_labels|train, test"):
        read_cifar("cifar100", str(tmp_path))


def test_augment_is_crop_and_flip_from_the_generator():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    out = augment_batch(x, np.random.default_rng(5))
    g = np.random.default_rng(5)            # independent reference: np.pad, slice, flip
    dy, dx, flip = g.integers(0, 9, 6), g.integers(0, 9, 6), g.integers(0, 2, 6)
    for i in range(6):
        p = np.pad(x[i], ((0, 0), (4, 4), (4, 4)))[:, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        np.testing.assert_array_equal(out[i], p[:, :, ::-1] if flip[i] else p)
    np.testing.assert_array_equal(out, augment_batch(x, np.random.default_rng(5)))
    assert not np.array_equal(out, augment_batch(x, np.random.default_rng(6)))


# -- factories --------------------------------------------------------------------
MODEL_FILE = '''
from torch import nn
import math
def make(input_shape, num_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Sequential(nn.Linear(width, width), nn.Tanh()), nn.Linear(width, num_classes))
def wrong_width(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))
def boom(input_shape, num_classes):
    raise RuntimeError("no GPU here")
def not_module(input_shape, num_classes):
    return 42
class Net(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.a = nn.Linear(math.prod(input_shape), num_classes)
    def forward(self, x):
        return self.a(x.flatten(1))
NOT_CALLABLE = 3
'''


def test_factory_resolves_from_a_file_relative_to_the_config(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.py").write_text(MODEL_FILE)
    (tmp_path / "c.toml").write_text('[model]\nfactory = "sub/m.py:make"\nwidth = 5\n[algorithm]\nname = "cdsgd"\n')
    cfg = C.load(tmp_path / "c.toml")
    assert cfg.model.factory == f"{tmp_path / 'sub' / 'm.py'}:make"
    assert cfg.model.factory_kwargs() == {"width": 5}
    assert C.from_dict(C.to_dict(cfg)) == cfg                         # the broadcast form round-trips
    assert C.to_dict(cfg)["model"] == {"factory": cfg.model.factory, "loss": "ce", "dtype": "float32", "width": 5}
    m1 = make_model(cfg.model, (2, 3), 4, seed=7)
    m2 = make_model(cfg.model, (2, 3), 4, seed=7)
    assert [p.shape for p in m1.parameters()][0] == (5, 6)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))   # seeded like build_model
    check_output(m1, torch.zeros(2, 2, 3), 4)
    assert len(model_units(m1)) == 3               # nested Sequential flattened: 3 weight layers, 3 units


def test_factory_from_an_importable_module():
    fn = resolve_factory("mpidl.models:MLP")
    assert fn.__name__ == "MLP"


@pytest.mark.parametrize("spec,match", [
    ("nosuchmod_xyz:make", "cannot import nosuchmod_xyz"),
    ("m.py:nothere", "has no attribute 'nothere'"),
    ("m.py:NOT_CALLABLE", "not callable"),
    ("missing.py:make", "not found"),
])
def test_factory_resolution_errors(tmp_path, monkeypatch, spec, match):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MpidlError, match=match):
        resolve_factory(spec)


def test_factory_is_a_config_error_for_pdadmm_and_next():
    for algo in ("pdadmm", "pdadmm-q", "next"):
        with pytest.raises(MpidlError, match=f"cannot be used with algorithm '{algo}'"):
            C.load(None, ["model.factory=x.py:f", f"algorithm.name={algo}"])


def test_non_sequential_model_needs_k1_for_the_grid():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x)
    with pytest.raises(MpidlError, match="needs an nn.Sequential.*K = 1"):
        model_units(Net())


# -- the CLI: bad input is one line and exit 2 on every rank ------------------------
def _cli(tmp_path, n, *args, timeout=240):
    d = tmp_path / "ranks"
    d.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", D=str(d))
    proc = subprocess.run([*mpiexec(), "-n", str(n), "sh", "-c", PER_RANK, sys.executable, *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rcs = {r: (d / f"rc.{r}").read_text().strip() for r in range(n)}
    err = {r: (d / f"err.{r}").read_text() for r in range(n)}
    out = {r: (d / f"out.{r}").read_text() for r in range(n)}
    return rcs, err, out


def _bad_files(tmp_path):
    a = _arrays()
    (tmp_path / "m.py").write_text(MODEL_FILE)
    cases = {}

    def npz(name, **change):
        arrs = {k: v for k, v in dict(a, **change).items() if v is not None}
        np.savez(tmp_path / name, **arrs)
        return name
    cases["missing key"] = (npz("nokey.npz", y_test=None), "no array 'y_test'")
    cases["length mismatch"] = (npz("len.npz", y_train=a["y_train"][:-1]), "x_train has 300 rows but y_train has 299")
    cases["negative label"] = (npz("neg.npz", y_train=np.where(np.arange(300) == 7, -1, a["y_train"])),
                               "label -1 (y_train row 7) is outside")
    np.savez(tmp_path / "big.npz", **a, num_classes=2)
    cases["label >= classes"] = ("big.npz", "is outside 0..1")
    xn = a["x_train"].copy()
    xn[11, 2] = np.nan
    cases["nan"] = (npz("nan.npz", x_train=xn), "NaN or inf")
    cases["empty test"] = (npz("empty.npz", x_test=a["x_test"][:0], y_test=a["y_test"][:0]), "test set is empty")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    cases["unreadable"] = ("junk.npz", "cannot read data file")
    xh = a["x_train"].copy()
    xh[299, 0] = np.inf
    _write_h5(tmp_path / "inf.h5", dict(a, x_train=xh))
    cases["inf in h5 (last row)"] = ("inf.h5", "x_train row 299 holds NaN or inf")
    _write_h5(tmp_path / "nokey.h5", {k: v for k, v in a.items() if k != "x_test"})
    cases["h5 missing key"] = ("nokey.h5", "no dataset 'x_test'")
    np.savez(tmp_path / "good.npz", **a)
    return cases


FACTORY_CASES = [
    ("nosuchmod_xyz:make", "cannot import nosuchmod_xyz"),
    ("m.py:NOT_CALLABLE", "not callable"),
    ("m.py:boom", "raised RuntimeError: no GPU here"),
    ("m.py:not_module", "returned a int, not a torch.nn.Module"),
    ("m.py:wrong_width", "(2, 4), but this data needs (2, 3)"),
]


def _setup_error(tmp_path, sets, monkeypatch):
    """The error that building the run's session raises at 1 rank (in-process)."""
    from mpi4py import MPI

    from mpidl.layouts import setup_for
    monkeypatch.chdir(tmp_path)
    cfg = C.load(None, sets + ["run.batch_size=16"])
    with pytest.raises(MpidlError) as e:
        setup_for(cfg)(cfg, MPI.COMM_SELF).close()
    return str(e.value)


def test_every_bad_input_is_one_clear_error(tmp_path, monkeypatch):
    cases = _bad_files(tmp_path)
    runs = [([f"data.path={f}", "model.factory=m.py:make", 'data.check="full"'], m) for f, m in cases.values()]
    runs += [(["data.path=good.npz", f"model.factory={spec}"], m) for spec, m in FACTORY_CASES]
    for sets, match in runs:
        msg = _setup_error(tmp_path, sets, monkeypatch)
        assert match in msg and "\n" not in msg, (sets, msg)


@pytest.mark.parametrize("case", ["inf in h5 (last row)", "inf in h5 (check = batch)", "factory raises",
                                  "label >= classes"])
def test_bad_input_through_the_cli_is_one_line_and_exit_2(tmp_path, case):
    """At 3 ranks: one line from rank 0, exit 2 everywhere, nothing under run.out.  The inf sits in
    the last training row, which only one rank's shard holds (the error is agreed).  With
    ``check = "batch"`` (the HDF5 default) it is found when its batch is read: the run has started,
    and the message names the step and the last good checkpoint."""
    cases = _bad_files(tmp_path)
    sets = {"inf in h5 (last row)": (["data.path=inf.h5", "model.factory=m.py:make", 'data.check="full"',
                                      "data.partition=contiguous"], cases["inf in h5 (last row)"][1]),
            "inf in h5 (check = batch)": (["data.path=inf.h5", "model.factory=m.py:make", "run.steps=20",
                                           "run.checkpoint_every=1", "data.partition=contiguous"],
                                          "x_train row 299 holds NaN or inf (read for step"),
            "factory raises": (["data.path=good.npz", "model.factory=m.py:boom"], FACTORY_CASES[2][1]),
            "label >= classes": (["data.path=big.npz", "algorithm.name=fdg", "algorithm.stages=3",
                                  "model.factory=m.py:make"], cases["label >= classes"][1])}[case]
    out_dir = tmp_path / "out"
    args = ["run"] + [x for s in sets[0] for x in ("--set", s)] + ["--set", f'run.out="{out_dir}"',
                                                                  "--set", "run.batch_size=16"]
    n = 3
    rcs, err, out = _cli(tmp_path, n, *args)
    assert rcs == {r: "2" for r in range(n)}, (rcs, err)
    lines = [ln for ln in err[0].splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and sets[1] in lines[0], err[0][-2000:]
    assert all(not err[r].strip() for r in range(1, n)), err
    assert not any("Traceback" in out[r] for r in range(n))
    if "batch" in case:
        assert "on rank 2" in lines[0] and "Last good checkpoint: step" in lines[0], lines[0]
        assert (out_dir / "default" / "checkpoints").is_dir() or any(out_dir.rglob("checkpoints")), lines[0]
    else:
        assert not out_dir.exists(), f"{out_dir} was created"


def test_resume_with_another_data_file_is_an_error(tmp_path):
    a = _arrays()
    np.savez(tmp_path / "a.npz", **a)
    b = dict(a, x_train=a["x_train"] * 2)
    np.savez(tmp_path / "b.npz", **b)
    (tmp_path / "m.py").write_text(MODEL_FILE)
    common = ["--set", "model.factory=m.py:make", "--set", "run.batch_size=16", "--set", "run.steps=6",
              "--set", "run.checkpoint_every=3", "--set", f'run.out="{tmp_path / "out"}"', "--set", "run.name=r"]
    rcs, err, _ = _cli(tmp_path, 2, "run", "--set", "data.path=a.npz", *common)
    assert rcs == {0: "0", 1: "0"}, err
    rcs, err, _ = _cli(tmp_path, 2, "run", "--set", "data.path=b.npz", *common, "--resume", "auto")
    assert rcs == {0: "2", 1: "2"} and "data_file" in err[0], err
    np.savez(tmp_path / "c.npz", **a)                      # same path, other contents (same size)
    rcs, err, _ = _cli(tmp_path, 2, "run", "--set", "data.path=c.npz", *common[:-2], "--set", "run.name=c")
    assert rcs == {0: "0", 1: "0"}, err
    np.savez(tmp_path / "c.npz", **b)
    rcs, err, _ = _cli(tmp_path, 2, "run", "--set", "data.path=c.npz", *common[:-2], "--set", "run.name=c",
                       "--resume", "auto")
    assert rcs == {0: "2", 1: "2"} and "data_sha256_head" in err[0], err
    rcs, err, _ = _cli(tmp_path, 2, "run", "--set", "data.path=a.npz", *common[:-2], "--set", "run.name=r",
                       "--set", "model.factory=m.py:Net", "--resume", "auto")
    assert rcs == {0: "2", 1: "2"} and "model_factory" in err[0], err
    with h5py.File(tmp_path / "out" / "r" / "results.h5") as f:
        assert f.attrs["model_factory"] == "m.py:make"
        assert f.attrs["data_file"] == str(tmp_path / "a.npz")
        assert f.attrs["data_sha256_head"] == fingerprint(tmp_path / "a.npz")["data_sha256_head"]


# -- the worked example of docs/your-model-your-data.md, exactly as written -----------
def doc_files(doc: Path) -> dict:
    """``{name: text}`` of the blocks marked ``<!-- file: NAME -->`` in a docs page."""
    text = doc.read_text()
    return {m.group(1): m.group(2) for m in
            re.finditer(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S)}


def test_docs_worked_example(tmp_path):
    doc = ROOT / "docs" / "your-model-your-data.md"
    files = doc_files(doc)
    assert set(files) == {"mymodel.py", "make_data.py", "mine.toml", "make_npy.py"}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    subprocess.run([sys.executable, "make_data.py"], cwd=tmp_path, check=True)
    cmds = re.findall(r"^mpiexec -n 4 python -m mpidl run (mine\.toml.*)$", doc.read_text(), flags=re.M)
    assert len(cmds) == 3, cmds
    env = dict(os.environ, OMP_NUM_THREADS="1")
    accs = {}
    for cmd in cmds:
        proc = subprocess.run([*mpiexec(), "-n", "4", sys.executable, "-m", "mpidl", "run", *cmd.split()[:]],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = re.search(r"finished \(done\) at step \d+/\d+: test acc ([0-9.]+)", proc.stdout)
        assert m, proc.stdout[-2000:]
        accs[cmd] = float(m.group(1))
    # 4 classes: chance is about 0.25; each family learns the problem
    assert all(a > 0.6 for a in accs.values()), accs
    assert (tmp_path / "runs" / "cdmsgd_ring" / "results.h5").is_file()


def test_docs_npy_folder_example(tmp_path):
    """The .npy folder of docs/your-model-your-data.md: written in blocks by make_npy.py, trained by
    the documented command (2 ranks); it learns the problem, and memory-maps the inputs."""
    doc = ROOT / "docs" / "your-model-your-data.md"
    files = doc_files(doc)
    for name in ("mymodel.py", "mine.toml", "make_npy.py"):
        (tmp_path / name).write_text(files[name])
    subprocess.run([sys.executable, "make_npy.py"], cwd=tmp_path, check=True)
    assert sorted(p.name for p in (tmp_path / "mynpy").iterdir()) == sorted(
        ["x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy"])
    src = open_path(tmp_path / "mynpy")
    assert type(src.x_train).__name__ == "MappedRows" and src.x_train.shape == (2400, 20)
    cmds = re.findall(r"^mpiexec -n 2 python -m mpidl run (mine\.toml --set data\.path=mynpy)$", doc.read_text(),
                      flags=re.M)
    assert len(cmds) == 1, cmds
    proc = subprocess.run([*mpiexec(), "-n", "2", sys.executable, "-m", "mpidl", "run", *cmds[0].split()],
                          cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"finished \(done\) at step \d+/\d+: test acc ([0-9.]+)", proc.stdout)
    assert m and float(m.group(1)) > 0.6, proc.stdout[-2000:]
    with h5py.File(tmp_path / "runs" / "cdmsgd_ring" / "results.h5") as f:
        assert f.attrs["data_file"] == str(tmp_path / "mynpy")


@pytest.mark.parametrize("method", ["cdmsgd", "fdg", "lsgd"])
def test_shipped_cifar10_configs_train_on_a_cifar_format_folder(tmp_path, method):
    """jobs/configs/cifar10_resnet20_*.toml run two steps on a small CIFAR-format folder (1 rank)."""
    from mpi4py import MPI

    from mpidl.driver import train
    write_cifar(tmp_path / "data", per_file=8)
    cfg = C.load(ROOT / "jobs" / "configs" / f"cifar10_resnet20_{method}.toml",
                 [f'data.data_dir="{tmp_path / "data"}"', "run.batch_size=8", "run.steps=2",
                  f'run.out="{tmp_path / "out"}"', "data.eval_samples=8"]
                 + (["algorithm.stages=1"] if method == "fdg" else []))
    assert cfg.data.augment and cfg.model.name == "resnet20"
    res = train(cfg, MPI.COMM_SELF)
    assert res["step"] == 2 and 0.0 <= res["test_acc"] <= 1.0


@pytest.mark.parametrize("algo,sets", [
    ("pdadmm", ["model.hidden=[16]", "run.batch_size=0", "algorithm.name=pdadmm"]),
    ("next", ["model.name=convex-lsq", "run.batch_size=0", "algorithm.name=next"]),
])
def test_pdadmm_and_next_read_a_data_file(tmp_path, algo, sets):
    from mpi4py import MPI

    from mpidl.driver import train
    rng = np.random.default_rng(0)
    if algo == "pdadmm":
        y = rng.integers(0, 3, 250)                 # well separated classes, 2 x 3 x 3 "images"
        x = (3.0 * rng.standard_normal((3, 18))[y] + 0.3 * rng.standard_normal((250, 18))).astype(np.float32)
        x = x.reshape(250, 2, 3, 3)
        a = dict(x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    else:
        x = rng.standard_normal((250, 5)).astype(np.float32)
        y = (x @ np.arange(1.0, 6.0) + 0.01 * rng.standard_normal(250)).astype(np.float32)
        a = dict(x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    np.savez(tmp_path / "d.npz", **a)
    cfg = C.load(None, sets + [f"data.path={tmp_path / 'd.npz'}", "run.steps=30", f'run.out="{tmp_path}"'])
    res = train(cfg, MPI.COMM_SELF)
    if algo == "pdadmm":
        assert res["test_acc"] > 0.6, res       # 3 classes: chance is about 1/3
        from mpidl.checkpoint import CheckpointStore
        assert CheckpointStore(tmp_path / "pdadmm_ring" / "checkpoints", None).manifest(30)["meta"]["dims"] \
            == "18,16,3"                        # the MLP reads the flattened rows
    else:
        assert res["test_mse"] < 0.1 * float(np.var(a["y_test"])), res    # fits the planted linear model


def test_average_model_is_scored_with_averaged_batchnorm_statistics(tmp_path):
    """At 1 rank the average model is the agent's own model: with BatchNorm its test accuracy must
    equal the agent's own (it did not while the evaluation copy kept its initial running stats)."""
    from mpi4py import MPI

    from mpidl.driver import train
    (tmp_path / "bn.py").write_text(
        "from torch import nn\nimport math\n"
        "def make(input_shape, num_classes):\n"
        "    d = math.prod(input_shape)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(),\n"
        "                         nn.Linear(16, num_classes))\n")
    a = _arrays(n=400, nt=200)
    a["x_train"] = a["x_train"] * 3.0 + 2.0     # far from BatchNorm's initial statistics
    a["x_test"] = a["x_test"] * 3.0 + 2.0
    np.savez(tmp_path / "d.npz", **a)
    cfg = C.load(None, [f"data.path={tmp_path / 'd.npz'}", f"model.factory={tmp_path / 'bn.py'}:make",
                        "algorithm.name=centralized", "algorithm.lr=0.1", "run.batch_size=32", "run.steps=40",
                        "data.eval_samples=0", f'run.out="{tmp_path / "out"}"'])
    res = train(cfg, MPI.COMM_SELF)
    assert res["test_acc"] == res["agent_acc_mean"], res
    assert res["test_acc"] > 0.6, res
