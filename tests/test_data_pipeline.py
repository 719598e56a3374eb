"""Data at the speed of memory (issue 30): the prefetching reader, block shuffling, per-batch
checks, memory-mapped .npy folders and the staged (pinned) batch path, serial and in process.
The MPI side (bitwise with and without prefetch, resume, one error on every rank) is in
tests/mpi/mpitest_user_data.py."""
import threading
import time

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpidl import config as C
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.convex import Order, batch_indices, epoch_permutation
from mpidl.driver import DataStepError, train
from mpidl.errors import MpidlError
from mpidl.prefetch import Prefetcher
from mpidl import sources as S
from mpidl import topology as T


def _arrays(n=400, nt=100, d=12, c=4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, c))
    x = rng.standard_normal((n + nt, d)).astype(np.float32)
    y = np.argmax(x @ w, 1).astype(np.int64)
    return dict(x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])


def _write_h5(path, arrs, chunk=32, **kw):
    with h5py.File(path, "w") as f:
        for k, v in arrs.items():
            f.create_dataset(k, data=v, chunks=((chunk,) + v.shape[1:]) if v.ndim > 1 else None, **kw)
    return str(path)


def _write_npy(folder, arrs):
    folder.mkdir(exist_ok=True)
    for k, v in arrs.items():
        np.save(folder / f"{k}.npy", v)
    return str(folder)


# -- the reader thread ----------------------------------------------------------------
def test_prefetcher_gives_make_k_in_order_restarts_on_a_jump_and_raises_at_the_bad_step():
    made = []

    def make(k):
        made.append(k)
        if k == 7:
            raise OSError("disk gone at 7")
        return k * k
    pf = Prefetcher(make, depth=2)
    try:
        assert [pf.get(k) for k in range(5)] == [k * k for k in range(5)]
        time.sleep(0.05)
        assert max(made) <= 4 + 2                 # never more than depth ahead
        assert pf.get(3) == 9 and pf.restarts == 2      # a jump back starts over
        assert pf.get(4) == 16 and pf.get(5) == 25 and pf.get(6) == 36
        with pytest.raises(OSError, match="disk gone at 7"):
            pf.get(7)
        assert pf.get(8) == 64                    # the error belongs to step 7 only
        deadline = time.time() + 5
        while pf.ready(9) is None and time.time() < deadline:
            time.sleep(0.01)
        assert pf.ready(9) == 81 and pf.get(9) == 81
    finally:
        pf.close()
    assert not any(t.name == "mpidl-reader" and t.is_alive() for t in threading.enumerate())


def test_an_error_past_the_last_step_is_never_raised():
    pf = Prefetcher(lambda k: 1 / (3 - k), depth=4)     # step 3 would raise ZeroDivisionError
    assert [pf.get(k) for k in range(3)] == [1 / 3, 1 / 2, 1.0]
    pf.close()


# -- the batch order --------------------------------------------------------------------
def test_block_order_is_a_permutation_whose_batches_touch_few_blocks():
    n, block, buf, batch = 1000, 32, 4, 25
    assert np.array_equal(epoch_permutation(n, 3, 1, 2), np.random.default_rng([3, 1, 2]).permutation(n))
    p = epoch_permutation(n, 3, 1, 2, "block", block, buf)
    assert np.array_equal(np.sort(p), np.arange(n))
    assert not np.array_equal(p, epoch_permutation(n, 3, 1, 3, "block", block, buf))   # a new order each epoch
    q = epoch_permutation(1024, 3, 1, 2, "block", block, buf) // block      # whole blocks only
    for g in range(0, 1024, block * buf):          # each buffer run is whole blocks, rows mixed among them
        run = q[g:g + block * buf]
        assert len(np.unique(run)) == buf and np.all(np.bincount(run)[np.unique(run)] == block)
        assert len(np.unique(run[:block])) > 1
    blocks = p // block
    for j in range(n // batch):
        assert len(np.unique(blocks[j * batch:(j + 1) * batch])) <= 2 * buf     # a batch spans <= 2 runs
    o = Order(n, batch, n // batch, 3, 1, "block", block, buf)
    assert np.array_equal(o.indices(2 * (n // batch) + 5),
                          batch_indices(n, batch, n // batch, 3, 1, 2 * (n // batch) + 5, "block", block, buf))


# -- sources --------------------------------------------------------------------------
@pytest.mark.parametrize("compression", [None, "gzip"])
def test_lazy_reads_equal_numpy_in_every_pattern(tmp_path, compression):
    a = _arrays(n=2000)
    src = S.open_path(_write_h5(tmp_path / "a.h5", a, compression=compression))
    assert src.x_train.filtered == (compression is not None) and src.x_train.block_rows == 32
    assert bool(src.x_train._raw) == (compression is None)     # uncompressed: preadv at the rows' offsets
    x = a["x_train"]
    rng = np.random.default_rng(0)
    for pos in (rng.choice(2000, 64, replace=False),              # scattered: one read per row
                np.arange(100, 160)[::-1], rng.integers(500, 600, 70),   # a slab / dense with repeats
                np.array([5]), np.array([], np.int64)):
        assert np.array_equal(src.x_train.read(pos), x[pos])
    with h5py.File(tmp_path / "c.h5", "w") as f:                     # contiguous layout, other dtype
        f.create_dataset("x", data=(x * 100).astype(">i4"))
    c = S.Rows(tmp_path / "c.h5", "x")
    pos = rng.choice(2000, 50, replace=False)
    assert bool(c._raw) and np.array_equal(c.read(pos), (x[pos] * 100).astype(">i4").astype(np.float32))
    v = src.x_train.view(np.arange(1, 2000, 3))
    assert np.array_equal(v.read(np.array([4, 0, 600])), x[np.arange(1, 2000, 3)[[4, 0, 600]]])
    assert np.array_equal(v.file_rows([4]), [13])


def test_npy_folder_is_memory_mapped_and_trains_like_the_npz(tmp_path, monkeypatch):
    a = _arrays()
    folder = _write_npy(tmp_path / "data", a)
    np.savez(tmp_path / "d.npz", **a)
    src = S.open_path(folder)
    assert isinstance(src.x_train, S.MappedRows) and isinstance(src.x_train._a, np.memmap)
    assert np.array_equal(src.x_train.read(np.array([7, 3, 3])), a["x_train"][[7, 3, 3]])
    assert bool(src.x_train._raw)                     # C order: preadv at the rows' offsets
    np.save(tmp_path / "f.npy", np.asfortranarray(a["x_train"]))
    f = S.MappedRows(tmp_path / "f.npy", "x_train")     # Fortran order: through the map
    assert not f._raw and np.array_equal(f.read(np.array([9, 1, 9])), a["x_train"][[9, 1, 9]])
    assert np.array_equal(np.asarray(src.x_test), a["x_test"]) and src.num_classes == 4
    fp = S.fingerprint(folder)
    assert fp["data_bytes"] == sum((tmp_path / "data" / f).stat().st_size for f in S.NPY_FILES)
    monkeypatch.chdir(tmp_path)
    runs = {}
    for name, path in (("npy", folder), ("npz", "d.npz")):
        train(_cfg(tmp_path, name, f"data.path={path}"), MPI.COMM_SELF)
        runs[name] = _state(tmp_path, name, 12)
    assert _same(runs["npy"], runs["npz"])


def test_npy_folder_missing_a_file_is_a_config_error(tmp_path):
    a = _arrays()
    del a["y_test"]
    folder = _write_npy(tmp_path / "data", a)
    with pytest.raises(C.ConfigError, match=r"\[data\] path .*has no y_test.npy"):
        C.load(None, [f"data.path={folder}"])
    with pytest.raises(S.SourceError, match="has no y_test.npy"):
        S.open_path(folder)


def test_label_out_of_range_names_the_row(tmp_path):
    """Labels are in memory (the partition needs them), so they are checked at start-up in every mode."""
    a = _arrays()
    a["y_train"][-1] = 9
    with h5py.File(_write_h5(tmp_path / "a.h5", a), "a") as f:
        f.attrs["num_classes"] = 4
    with pytest.raises(S.SourceError, match=r"label 9 \(y_train row 399\) is outside 0..3"):
        S.open_path(tmp_path / "a.h5", check=False)


# -- training in process ------------------------------------------------------------------
def _cfg(d, name, *extra):
    return C.load(None, ["model.hidden=[16]", "run.batch_size=16", f'run.out="{d}/out"', f"run.name={name}",
                         "run.steps=12", "run.log_every=3", "run.checkpoint_every=6", "algorithm.name=cdmsgd",
                         "algorithm.lr=0.05"] + list(extra))


def _state(d, name, step):
    with GraphComm(MPI.COMM_SELF, T.complete(1)) as gc:
        state, _ = CheckpointStore(f"{d}/out/{name}/checkpoints", gc).load(step)
    return state["algo"]


def _same(a, b):
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_staged_batches_on_the_cpu_equal_the_plain_path(tmp_path, monkeypatch):
    """The GPU path (reader's batch copied with non_blocking, the next one issued during the step),
    run on the CPU as the communicators' staging is: bitwise the plain run, and it did issue early."""
    import mpidl.oracles as O
    h5 = _write_h5(tmp_path / "a.h5", _arrays())
    train(_cfg(tmp_path, "plain", f"data.path={h5}"), MPI.COMM_SELF)
    early = []
    close = O.BatchStream.close

    def spy(self):
        early.append(self.early_copies)
        close(self)
    train(_cfg(tmp_path, "block", f"data.path={h5}", 'data.shuffle="block"'), MPI.COMM_SELF)
    assert not _same(_state(tmp_path, "plain", 12), _state(tmp_path, "block", 12))   # another order
    monkeypatch.setattr(O, "STAGE_ON_CPU", True)
    monkeypatch.setattr(O.BatchStream, "close", spy)
    train(_cfg(tmp_path, "staged", f"data.path={h5}", "data.prefetch=2"), MPI.COMM_SELF)
    assert _same(_state(tmp_path, "plain", 12), _state(tmp_path, "staged", 12))
    assert early and early[0] > 0, early


def test_nan_row_stops_at_its_step_with_the_last_checkpoint_intact(tmp_path):
    """check = batch (the HDF5 default): no start-up scan, the error names file, row and step."""
    a = _arrays()
    perm = epoch_permutation(400, 0, 0, 0)
    row = int(perm[16 * 8 + 5])                     # in the batch of step 8
    a["x_train"][row, 3] = np.inf
    h5 = _write_h5(tmp_path / "bad.h5", a)
    with pytest.raises(DataStepError) as e:
        train(_cfg(tmp_path, "bad", f"data.path={h5}"), MPI.COMM_SELF)
    msg = str(e.value)
    assert f"bad.h5: x_train row {row} holds NaN or inf (read for step 8 on rank 0" in msg, msg
    assert "Last good checkpoint: step 6" in msg and "\n" not in msg
    assert _state(tmp_path, "bad", 6) is not None
    steps = sorted(int(d.name.split("_")[1]) for d in (tmp_path / "out" / "bad" / "checkpoints").glob("step_*"))
    assert steps == [6], steps                      # nothing saved after the bad batch
    with pytest.raises(MpidlError, match=f"x_train row {row} holds NaN or inf"):   # check = full: at start-up
        train(_cfg(tmp_path, "full", f"data.path={h5}", 'data.check="full"'), MPI.COMM_SELF)
    assert not (tmp_path / "out" / "full").exists()
    train(_cfg(tmp_path, "off", f"data.path={h5}", 'data.check="off"', "run.steps=6"), MPI.COMM_SELF)


def test_reader_that_raises_in_the_thread_is_one_error_naming_the_step(tmp_path, monkeypatch):
    h5 = _write_h5(tmp_path / "a.h5", _arrays())
    read = S.Rows.read
    calls = []

    def flaky(self, pos):
        if self.name == "x_train" and len(pos) == 16:
            calls.append(threading.current_thread().name)
            if len(calls) == 5:
                raise OSError("Can't read data (file read failed)")
        return read(self, pos)
    monkeypatch.setattr(S.Rows, "read", flaky)
    with pytest.raises(DataStepError, match=r"reading the training batch of step 4 on rank 0 failed: OSError: "
                                            r"Can't read data .*Last good checkpoint: step 3 in"):
        train(_cfg(tmp_path, "flaky", f"data.path={h5}", "run.checkpoint_every=3"), MPI.COMM_SELF)
    assert calls[0].startswith("mpidl-reader")      # it was read by the reader thread


def test_truncated_hdf5_file_is_one_clear_error(tmp_path):
    h5 = _write_h5(tmp_path / "a.h5", _arrays(n=4000))
    raw = open(h5, "rb").read()
    (tmp_path / "t.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MpidlError) as e:
        train(_cfg(tmp_path, "trunc", f"data.path={tmp_path / 't.h5'}"), MPI.COMM_SELF)
    assert "t.h5" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_first_bad_row_finds_nan_and_inf_and_not_large_values():
    import torch
    a = np.ones((6, 2, 3), np.float32)
    assert S.first_bad_row(a) == -1 and S.first_bad_row(np.full((4, 3), 3e38, np.float32)) == -1
    assert S.first_bad_row(np.full((4, 3), 1e308)) == -1            # a float64 sum that overflows: no bad row
    a[4, 1, 2], a[2, 0, 0] = np.inf, -np.inf                        # inf - inf: the sum is NaN
    assert S.first_bad_row(a) == 2 and S.first_bad_row(torch.from_numpy(a)) == 2
    a[1, 1, 1] = np.nan
    assert S.first_bad_row(a) == 1
