"""fdg without MPI: its local pieces against plain NumPy / torch, and whole M x K grids as threads.

The grids run ``fdg_grid.setup_grid`` and ``FDG.step`` on every rank of an M x K
grid in one process (tests/fakegrid.py stands in for the communicators), so
the pipeline with a middle stage (1 x 3), the replicas' allreduce (2 x 2), the
pipeline evaluation and the setup are checked in seconds against the stacked
reference (tests/reference/fdg.py) and the unsliced model.  The MPI run of
the same code is tests/mpi/mpitest_fdg.py.
"""
import math
import threading
import types

import numpy as np
import pytest
import torch

from fakegrid import run_grid
from mpidl import config
from mpidl.algorithms import fdg_grid
from mpidl.algorithms.fdg import FDG, FDGConfig, StageData, state_fields
from mpidl.algorithms.fdg_grid import _resumed_cuts, grid_shape, setup_grid
from mpidl.checkpoint import CheckpointStore
from mpidl.data import load_agent_data
from mpidl.errors import MpidlError
from mpidl.flat import FlatModel
from mpidl.models import build_model
from reference import fdg as ref

torch.set_num_threads(1)
BASE = ["data.dataset=digits", "model.dtype=float64", "run.batch_size=16", "algorithm.name=fdg",
        "model.hidden=[12, 10, 8]"]
HIDDEN = (12, 10, 8)


_BUILD = threading.Lock()


@pytest.fixture(autouse=True)
def _one_model_at_a_time(monkeypatch):
    """make_model seeds torch's global RNG: the grid's threads take turns (as separate processes need not)."""
    from mpidl import models
    build = models.make_model

    def locked(*a, **kw):
        with _BUILD:
            return build(*a, **kw)
    monkeypatch.setattr(models, "make_model", locked)


def _cfg(M, K, *extra):
    return config.load(None, BASE + [f"algorithm.stages={K}", f"algorithm.replicas={M}"] + list(extra))


class _World:
    """One rank's COMM_WORLD for setup_grid: its size; the communicators it builds are the fakes."""

    def __init__(self, mc, grid):
        self.mc, self.grid = mc, grid

    def Get_size(self):
        return self.mc.size


def _grid_comm(world, M, K, progress="none", **kw):
    assert (M, K) == (world.grid.M, world.grid.K), f"setup_grid asked for a {M} x {K} grid"
    assert progress == "none" and not kw, (progress, kw)   # the thread grid has no progress engine
    return world.grid


def _grid(cfg, M, K, work=lambda sess: sess):
    """{(m, k): work(session)} for every rank of the M x K grid (threads), set up by setup_grid."""
    def rank(m, k, mc, grid):
        return work(setup_grid(cfg, _World(mc, grid)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fdg_grid, "GraphComm", lambda world, topology: world.mc)
        mp.setattr(fdg_grid, "GridComm", _grid_comm)
        return run_grid(M, K, rank)


def _steps(T):
    def work(sess):
        sess.algo.trace, sess.before, sess.metrics = [], [], []  # weights before / metrics of each step
        state = sess.state
        for t in range(T):
            sess.before.append((state.x.clone() if torch.is_tensor(state.x) else state.x.copy()))
            state, metrics = sess.algo.step(t, state, sess.oracle, sess.comm)
            sess.metrics.append(metrics)
        return sess, state
    return work


def _whole_model(stage_weights, dataset="digits"):
    """The unsliced seeded MLP with the stages' weights concatenated (float64)."""
    shard = load_agent_data(dataset)
    model = build_model("mlp", shard.input_shape, shard.num_classes, HIDDEN, seed=0).double()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(np.concatenate(stage_weights)), model.parameters())
    return model, shard


# -- StageData -------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [10, 0])
def test_stage_data_batches_follow_the_documented_permutation(num_classes):
    """Batch b of replica m: permutation default_rng([seed, m, b // spe]) of the shard, slice b mod spe."""
    n, B, spe, seed, m = 23, 4, 5, 7, 2
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n) % 10 if num_classes else np.arange(n, dtype=np.float32) * 0.5
    data = StageData(x, y, batch=B, steps_per_epoch=spe, seed=seed, replica=m, dtype=torch.float64,
                     num_classes=num_classes)
    for b in (0, 3, 4, 5, 9, 12, 2, 14, 11):        # across epochs, and back to an earlier one
        idx = np.random.default_rng([seed, m, b // spe]).permutation(n)[(b % spe) * B:(b % spe + 1) * B]
        xb, yb = data.inputs(b), data.labels(b)
        assert xb.dtype == torch.float64 and np.array_equal(xb.numpy(), x[idx].astype(np.float64)), b
        assert yb.dtype == (torch.long if num_classes else torch.float64), yb.dtype
        assert np.array_equal(yb.numpy(), y[idx]), b


# -- the local math of one stage --------------------------------------------------------------------
def _algo(module, k, K, *, total=10, loss="ce", num_classes=3, shapes=((4,), (5,), (3,), (3,))):
    fm = FlatModel(module, torch.float64)
    return FDG(FDGConfig(stages=K), fm=fm, k=k, K=K, batch=6, shapes=list(shapes), steps_per_epoch=4,
               total_steps=total, loss=loss, num_classes=num_classes)


@pytest.mark.parametrize("K,T", [(1, 5), (3, 10), (3, 4), (3, 3), (4, 2)])
def test_stage_attributes(K, T):
    """Batches fed n_b = max(0, T - 2 (K - 1)); staleness and the boundary shapes of every stage."""
    shapes = [(4,), (5,), (3,), (2,), (3,)][:K + 1]
    for k in range(K):
        a = _algo(torch.nn.Linear(shapes[k][0], shapes[k + 1][0]), k, K, total=T, shapes=shapes)
        assert a.n_batches == max(0, T - 2 * (K - 1)) and a.d == 2 * (K - 1 - k)
        assert a.last == (k == K - 1) and a.in_shape == shapes[k] and a.out_shape == shapes[k + 1]


def test_loss_cross_entropy_and_squared():
    """The stage's loss against NumPy: batch-mean cross entropy, 0.5 mean ||out - onehot(y)||^2, and
    0.5 mean ||out - y||^2 for regression (num_classes = 0, or loss = "squared")."""
    rng = np.random.default_rng(3)
    out = rng.standard_normal((6, 3))
    y = np.array([0, 2, 1, 1, 0, 2])
    logp = out - out.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -logp[np.arange(6), y].mean()
    sq = 0.5 * np.mean(np.sum((out - np.eye(3)[y]) ** 2, 1))
    mod = torch.nn.Linear(4, 3)
    t_out = torch.from_numpy(out)
    assert abs(float(_algo(mod, 0, 1)._loss(t_out, torch.from_numpy(y))) - ce) < 1e-12
    a = _algo(mod, 0, 1, loss="squared")
    assert a.loss_kind == "squared" and abs(float(a._loss(t_out, torch.from_numpy(y))) - sq) < 1e-12
    yr = rng.standard_normal(6)
    a = _algo(torch.nn.Linear(4, 1), 0, 1, num_classes=0, shapes=((4,), (1,)))
    reg = 0.5 * np.mean((out[:, :1] - yr[:, None]) ** 2)
    assert a.loss_kind == "squared" and abs(float(a._loss(t_out[:, :1], torch.from_numpy(yr))) - reg) < 1e-12
    assert _algo(mod, 0, 1, loss="ce").loss_kind == "ce"


@pytest.mark.parametrize("k,K", [(0, 2), (1, 3), (2, 3)])
def test_forward_and_grads_at_the_given_weights(k, K):
    """f_k(h; w) and the vector-Jacobian product (dw, dh) at weights w that are not the live ones, against
    plain autograd on a copy of the module; stage 0 has no input gradient."""
    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    a = _algo(mod, k, K)
    rng = np.random.default_rng(k)
    w = rng.standard_normal(a.fm.x.size)
    h = rng.standard_normal((6, 4))
    delta = torch.from_numpy(rng.standard_normal((6, 3)))
    x_live = a.fm.x.copy()
    y, wl, hl = a._forward(w.copy(), h.copy(), keep_buffers=True)
    gw, gx = a._grads(y, wl, hl, delta)
    twin = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(w.copy()), twin.parameters())
    hh = torch.from_numpy(h.copy()).requires_grad_(True)
    out = twin(hh)
    out.backward(delta)
    gw_ref = torch.cat([p.grad.reshape(-1) for p in twin.parameters()]).numpy()
    assert np.abs(y.detach().numpy() - out.detach().numpy()).max() < 1e-14
    assert np.abs(gw - gw_ref).max() < 1e-13
    assert np.array_equal(a.fm.x, x_live)             # the live weights are not touched
    if k == 0:
        assert gx is None and not hl.requires_grad
    else:
        assert gx.is_contiguous() and np.abs(gx.numpy() - hh.grad.numpy()).max() < 1e-13


def test_forward_moves_batchnorm_statistics_only_when_asked():
    """keep_buffers=True: BatchNorm's running statistics take one momentum step toward the batch's
    (plain formula); keep_buffers=False (a graph rebuilt after a resume) leaves them alone."""
    mod = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()
    a = _algo(mod, 1, 2)
    h = np.random.default_rng(1).standard_normal((6, 4))
    lin = (h @ a.fm.x[:12].reshape(3, 4).T) + a.fm.x[12:15]
    bn = dict(mod.named_buffers())
    mean0, var0 = bn["1.running_mean"].clone().numpy(), bn["1.running_var"].clone().numpy()
    a._forward(a.fm.x.copy(), h.copy(), keep_buffers=False)
    assert np.array_equal(bn["1.running_mean"].numpy(), mean0) and np.array_equal(bn["1.running_var"].numpy(), var0)
    a._forward(a.fm.x.copy(), h.copy(), keep_buffers=True)
    assert np.abs(bn["1.running_mean"].numpy() - (0.9 * mean0 + 0.1 * lin.mean(0))).max() < 1e-13
    assert np.abs(bn["1.running_var"].numpy() - (0.9 * var0 + 0.1 * lin.var(0, ddof=1))).max() < 1e-13


def test_trace_records_copies():
    a = _algo(torch.nn.Linear(4, 3), 0, 2)
    a._event("fwd", 1, 0)                              # no trace: nothing recorded, no error
    a.trace = []
    h, g = torch.ones(2, 3), np.zeros(4)
    a._event("bwd", 5, 2, h, None, g)
    h += 1
    g += 1
    (kind, t, b, h_rec, none, g_rec), = a.trace
    assert (kind, t, b, none) == ("bwd", 5, 2, None)
    assert isinstance(h_rec, np.ndarray) and np.array_equal(h_rec, np.ones((2, 3))) and np.array_equal(g_rec, np.zeros(4))


# -- whole grids (threads) ---------------------------------------------------------------------------
def _stage_sizes(K, cuts):
    shard = load_agent_data("digits")
    stages = ref.mlp_stages(build_model("mlp", shard.input_shape, shard.num_classes, HIDDEN, seed=0).double(), cuts)
    shapes = [tuple(shard.input_shape)]
    h = torch.zeros((1,) + shapes[0], dtype=torch.float64)
    for s in stages:
        h = s(h)
        shapes.append(tuple(h.shape[1:]))
    return stages, shapes


@pytest.mark.parametrize("M,K,chunk", [(1, 3, 1000), (2, 2, 100), (1, 1, 1000)])
def test_grid_evaluation_matches_whole_model(M, K, chunk):
    """The pipeline evaluation (test set split over replicas, in chunks) == the unsliced model at the
    stages' weights: mean cross entropy and accuracy over the whole test set, the same on every rank."""
    cfg = _cfg(M, K, "algorithm.lr=0.1", f"algorithm.cuts={list(range(1, K))}", "run.steps=8")

    def work(sess):
        sess.eval_chunk = chunk
        sess, state = _steps(8)(sess)
        return sess.evaluate(state)[0], state.x.copy()
    out = _grid(cfg, M, K, work)
    model, shard = _whole_model([out[(0, k)][1] for k in range(K)])
    with torch.no_grad():
        logits = model(torch.as_tensor(shard.x_test).double())
    yt = torch.as_tensor(shard.y_test).long()
    acc = float((logits.argmax(1) == yt).double().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, yt))
    for ev, _ in out.values():
        assert abs(ev["test_acc"] - acc) < 1e-12 and abs(ev["test_loss"] - loss) < 1e-10, (ev, acc, loss)


def test_grid_regression_evaluation():
    """num_classes = 0 (synthetic-lsq): squared loss 0.5 mean (out - y)^2 over the test set, accuracy NaN."""
    cfg = config.load(None, ["data.dataset=synthetic-lsq", "model.dtype=float64", "run.batch_size=16",
                             "algorithm.name=fdg", "model.hidden=[12, 10, 8]", "algorithm.stages=2",
                             "algorithm.replicas=1", "algorithm.cuts=[2]", "run.steps=6", "algorithm.lr=0.01"])

    def work(sess):
        sess, state = _steps(6)(sess)
        return sess.evaluate(state)[0], state.x.copy(), sess.algo.loss_kind
    out = _grid(cfg, 1, 2, work)
    model, shard = _whole_model([out[(0, k)][1] for k in range(2)], "synthetic-lsq")
    with torch.no_grad():
        pred = model(torch.as_tensor(shard.x_test).double()).numpy()[:, 0]
    loss = 0.5 * np.mean((pred - shard.y_test.astype(np.float64)) ** 2)
    for ev, _, kind in out.values():
        assert kind == "squared" and abs(ev["test_loss"] - loss) < 1e-10 and math.isnan(ev["test_acc"]), ev


def test_grid_setup_sizes_and_description():
    """Iterations from epochs (ceil(epochs x steps/epoch)), float32 weights, replica m's shard and test
    slice, and the one-line description."""
    M, K = 2, 2
    cfg = _cfg(M, K, "algorithm.cuts=[3]", "run.steps=0", "run.epochs=1.5", 'model.dtype="float32"',
               "algorithm.beta=0.5")
    def work(sess):
        sess.threads = torch.get_num_threads()         # run.threads, set by setup_grid in this thread
        return sess
    torch.set_num_threads(3)
    out = _grid(cfg, M, K, work)
    torch.set_num_threads(1)
    assert all(sess.threads == 1 for sess in out.values())
    shards = [load_agent_data("digits", rank=m, world_size=M) for m in range(M)]
    spe = min(len(s.y) for s in shards) // 16
    T = math.ceil(1.5 * spe)
    full = load_agent_data("digits")
    for (m, k), sess in out.items():
        assert sess.steps_per_epoch == spe and sess.total == T and sess.algo.total == T
        assert sess.state.x.dtype == np.float32 and (sess.M, sess.K, tuple(sess.cuts)) == (M, K, (3,))
        assert np.array_equal(sess.test_y, full.y_test[m::M]) and sess.stage_costs is None
        assert np.array_equal(sess.data.labels(5).numpy(), shards[m].y[
            np.random.default_rng([0, m, 0]).permutation(len(shards[m].y))[80:96]])
        assert sess.expect == {"algorithm": "fdg", "grid": "2x2", "cuts": "3"}
        assert sess.describe() == (
            f"fdg: 2 x 2 grid (replicas x stages), cuts [3] of 4 units, staleness [2, 0], beta 0.5, "
            f"{spe} steps/epoch, {T - 2} batches fed ({T} iterations, pipeline drained at the end)")


def test_grid_runs_at_least_one_iteration():
    """run.steps = 0: ceil(epochs x steps/epoch) iterations, at least 1; run.steps = 1: one."""
    sess = _grid(_cfg(1, 1, "run.steps=0", "run.epochs=0.001"), 1, 1)[(0, 0)]
    assert sess.total == 1 and sess.algo.n_batches == 1
    sess = _grid(_cfg(1, 1, "run.steps=1", "run.epochs=3"), 1, 1)[(0, 0)]
    assert sess.total == 1


def test_grid_evaluation_of_one_sample():
    """A test set of one sample (one the initial model classifies right): its loss, accuracy 1 (no
    division by more than the sample count)."""
    shard = load_agent_data("digits")
    model = build_model("mlp", shard.input_shape, shard.num_classes, HIDDEN, seed=0).double()
    with torch.no_grad():
        logits = model(torch.as_tensor(shard.x_test).double())
    yt = torch.as_tensor(shard.y_test).long()
    i = int(torch.nonzero(logits.argmax(1) == yt)[0, 0])
    loss = float(torch.nn.functional.cross_entropy(logits[i:i + 1], yt[i:i + 1]))

    def work(sess):
        sess.test_x, sess.test_y = sess.test_x[i:i + 1], sess.test_y[i:i + 1]
        return sess.evaluate(sess.state)[0]
    for ev in _grid(_cfg(1, 2, "algorithm.cuts=[2]", "run.steps=2"), 1, 2, work).values():
        assert abs(ev["test_loss"] - loss) < 1e-12 and ev["test_acc"] == 1.0, (ev, loss)

    def empty(sess):
        sess.test_x, sess.test_y = sess.test_x[:0], sess.test_y[:0]
        return sess.evaluate(sess.state)[0]
    for ev in _grid(_cfg(1, 2, "algorithm.cuts=[2]", "run.steps=2"), 1, 2, empty).values():
        assert ev == {"test_loss": 0.0, "test_acc": 0.0}, ev   # an empty test set: no division by zero


def test_grid_reads_data_dir(tmp_path, monkeypatch):
    """[data] data_dir is where the IDX files are read from."""
    from test_data import _fake_mnist
    monkeypatch.delenv("MPIDL_DATA", raising=False)
    _, y, _, yt = _fake_mnist(tmp_path / "mnist", n=64)
    cfg = config.load(None, ["data.dataset=mnist", f'data.data_dir="{tmp_path / "mnist"}"', "run.batch_size=16",
                             "algorithm.name=fdg", "model.hidden=[12]", "algorithm.stages=1", "run.steps=1"])
    sess = _grid(cfg, 1, 1)[(0, 0)]
    assert np.array_equal(sess.test_y, yt) and sess.steps_per_epoch == 4


@pytest.mark.parametrize("K,cuts,shares", [(1, (), None), (2, (3,), (6, 4)), (3, (2, 3), (3, 3, 4)),
                                           (4, (1, 2, 3), (1, 2, 3, 4))])
def test_grid_measured_cuts(monkeypatch, K, cuts, shares):
    """No cuts given: rank 0's per-unit costs (here 1, 2, 3, 4), broadcast, give the cuts minimising the
    largest stage cost (unique here) and the stage costs; K = 1 measures nothing."""
    calls = []

    def costs(units, sample, repeats=5):
        calls.append(len(units))
        return [1.0, 2.0, 3.0, 4.0]
    monkeypatch.setattr(fdg_grid, "unit_costs", costs)
    out = _grid(_cfg(1, K, "run.steps=4"), 1, K)
    for sess in out.values():
        assert tuple(sess.cuts) == cuts and sess.n_units == 4
        assert sess.stage_costs == (None if shares is None else [float(c) for c in shares])
        tail = "" if shares is None else ", measured cost share per stage " + "/".join(
            f"{c / 10:.2f}" for c in shares)
        assert f"cuts {list(cuts)} of 4 units{tail}, staleness" in sess.describe()
    assert calls == ([] if K == 1 else [4])           # measured once, on rank 0


def test_grid_zero_costs_and_zero_threads(monkeypatch):
    """All-zero measured costs (a clock too coarse) describe equal shares of 0.00, not a division by zero;
    run.threads = 0 runs one torch thread."""
    monkeypatch.setattr(fdg_grid, "unit_costs", lambda *a, **k: [0.0] * 4)
    torch.set_num_threads(2)

    def work(sess):
        return sess, torch.get_num_threads()
    for sess, threads in _grid(_cfg(1, 2, "run.steps=4", "run.threads=0"), 1, 2, work).values():
        assert "measured cost share per stage 0.00/0.00, staleness" in sess.describe() and threads == 1
    torch.set_num_threads(1)


def test_grid_too_many_stages(monkeypatch):
    monkeypatch.setattr(fdg_grid, "unit_costs", lambda *a, **k: [1.0] * 4)
    with pytest.raises(MpidlError, match="4 cuttable units, fewer than the 5 stages"):
        _grid(_cfg(1, 5, "run.steps=4"), 1, 5)
    with pytest.raises(MpidlError, match="batch_size > 0"):
        _grid(_cfg(1, 2, "run.batch_size=0", "algorithm.cuts=[2]"), 1, 2)
    with pytest.raises(MpidlError, match="fdg cuts torch models into stages"):
        _grid(_cfg(1, 2, "model.name=convex-lsq", "algorithm.cuts=[2]"), 1, 2)
    with pytest.raises(MpidlError, match="does not fit 2 MPI ranks"):
        _grid(_cfg(2, 2, "algorithm.cuts=[2]"), 1, 2)


def _checkpoint(root, steps_cuts):
    store = CheckpointStore(root, None)
    for step, cuts in steps_cuts:
        store.save(step, {"x": np.zeros(2)}, meta={} if cuts is None else {"cuts": cuts})


def test_resumed_cuts(tmp_path):
    """The cuts in the manifest of the checkpoint a run resumes from: latest (auto) or the named step;
    None for a fresh run, a missing step, or a checkpoint without cuts."""
    def cfg(resume):
        return config.load(None, BASE + [f'run.out="{tmp_path}"', "run.name=r", f'run.resume="{resume}"'])
    assert _resumed_cuts(cfg("auto"), None) is None                   # no checkpoint yet
    _checkpoint(tmp_path / "r" / "checkpoints", [(2, "1,3"), (4, "2"), (6, None)])
    assert _resumed_cuts(cfg("no"), None) is None
    assert _resumed_cuts(cfg("auto"), None) is None                   # step 6 has no cuts
    assert _resumed_cuts(cfg("4"), None) == (2,)
    assert _resumed_cuts(cfg("2"), None) == (1, 3)
    assert _resumed_cuts(cfg("5"), None) is None
    _checkpoint(tmp_path / "r" / "checkpoints", [(8, "")])
    assert _resumed_cuts(cfg("auto"), None) == ()


def test_grid_resume_keeps_the_checkpointed_cuts(tmp_path, monkeypatch):
    """A resumed run takes the checkpoint's cuts when they fit K (no measuring); else it measures."""
    monkeypatch.setattr(fdg_grid, "unit_costs", lambda *a, **k: [1.0, 2.0, 3.0, 4.0])
    _checkpoint(tmp_path / "r" / "checkpoints", [(2, "1")])
    extra = [f'run.out="{tmp_path}"', "run.name=r", 'run.resume="auto"', "run.steps=4"]
    out = _grid(_cfg(1, 2, *extra), 1, 2)
    assert all(tuple(s.cuts) == (1,) and s.stage_costs is None for s in out.values())
    out = _grid(_cfg(1, 3, *extra), 1, 3)                             # "1" does not fit K = 3
    assert all(tuple(s.cuts) == (2, 3) and s.stage_costs == [3.0, 3.0, 4.0] for s in out.values())


@pytest.mark.parametrize("stages,replicas,size,want", [
    (2, 0, 4, (2, 2)), (1, 0, 3, (3, 1)), (3, 0, 3, (1, 3)), (2, 3, 6, (3, 2)), (4, 1, 4, (1, 4)),
    (3, 0, 4, "K = 3 stages and M = auto replicas does not fit 4 MPI ranks"),
    (2, 3, 4, "K = 2 stages and M = 3 replicas does not fit 4 MPI ranks"),
    (2, 1, 4, "M = 1 replicas does not fit 4"), (5, 0, 4, "does not fit 4")])
def test_grid_shape(stages, replicas, size, want):
    """(M, K) with M x K = world size (M = 0: size / K); anything else one MpidlError naming both."""
    acfg = types.SimpleNamespace(stages=stages, replicas=replicas)
    if isinstance(want, tuple):
        got = grid_shape(acfg, size)
        assert got == want and all(type(v) is int for v in got), got
    else:
        with pytest.raises(MpidlError, match=want):
            grid_shape(acfg, size)


@pytest.mark.parametrize("M,K", [(1, 3), (2, 2), (1, 1)])
def test_grid_pipeline_matches_stacked_reference(M, K):
    """Every rank's weights after 14 iterations == the stacked reference (1e-10); stage k backpropagates
    each batch exactly 2 (K - 1 - k) iterations after its forward; the last stage reports the loss and
    accuracy of its batch at the weights before its step (recomputed), the others none; the state's
    shapes and stash_bytes."""
    T, cuts = 14, tuple(range(1, K))
    cfg = _cfg(M, K, "algorithm.beta=0.5", "algorithm.momentum=0.9", "algorithm.weight_decay=0.001",
               "algorithm.lr=0.05", "algorithm.lr_schedule=diminishing", f"algorithm.cuts={list(cuts)}",
               f"run.steps={T}")
    out = _grid(cfg, M, K, _steps(T))
    spe = out[(0, 0)][0].steps_per_epoch
    a = cfg.algorithm
    stages, shapes = _stage_sizes(K, cuts)
    shards = [load_agent_data("digits", rank=m, world_size=M) for m in range(M)]
    batch = ref.batches([(s.x, s.y) for s in shards], 16, spe, 0)
    Wref = ref.fdg(stages, batch, M, T,
                   lambda t: a.lr / (1.0 + a.decay * t) ** a.power, mu=a.momentum, wd=a.weight_decay, beta=a.beta)
    assert spe == min(len(s.y) for s in shards) // 16
    assert state_fields() == ["x", "v", "w_stash", "in_stash", "act_in", "grad_in"]
    for (m, k), (sess, state) in out.items():
        err = np.abs(state.x - Wref[k]).max()
        assert err < 1e-10, f"rank ({m}, {k}): max |grid - reference| = {err:.3e}"
        d, P, B = 2 * (K - 1 - k), Wref[k].size, 16
        fwd = {b: t for kind, t, b, *_ in sess.algo.trace if kind == "fwd"}
        bwd = [(t, b) for kind, t, b, *_ in sess.algo.trace if kind == "bwd"]
        assert [b for _, b in bwd] == list(range(T - 2 * (K - 1)))
        assert all(t - fwd.get(b, t) == d for t, b in bwd) and (k == K - 1) == (not fwd)
        reported = [t for t, mt in enumerate(sess.metrics) if mt["loss"] is not None or mt["acc"] is not None]
        assert reported == ([t for t, _ in bwd] if k == K - 1 else [])
        for t, b in (bwd if k == K - 1 else []):
            h = next(p[0] for kind, tt, bb, *p in sess.algo.trace if (kind, tt, bb) == ("bwd", t, b))
            torch.nn.utils.vector_to_parameters(torch.from_numpy(sess.before[t].copy()), stages[k].parameters())
            with torch.no_grad():
                logits = stages[k](torch.from_numpy(h))
            yb = batch(m, b)[1]
            assert abs(sess.metrics[t]["loss"] - float(torch.nn.functional.cross_entropy(logits, yb))) < 1e-12
            assert sess.metrics[t]["acc"] == float((logits.argmax(1) == yb).double().mean())
        n_in, n_out = math.prod(shapes[k]), math.prod(shapes[k + 1])
        want = {"w_stash": 8 * d * P, "in_stash": 8 * d * B * n_in, "act_in": 8 * B * n_in if k else 0,
                "grad_in": 8 * B * n_out if k < K - 1 else 0}
        assert sess.algo.stash_bytes(state) == want
        assert state.in_stash.shape == (d, B) + shapes[k] and state.w_stash.shape == (d, P)
        assert state.act_in.shape == (((B,) + shapes[k]) if k else (0,))
        assert state.grad_in.shape == (((B,) + shapes[k + 1]) if k < K - 1 else (0,))
