"""pdADMM through the one driver loop: exact resume and one clear error on every rank."""
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import config
from mpidl import topology as T
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.driver import train
from mpidl.algorithms.pdadmm import PdADMMConfig
from mpidl.errors import MpidlError

MPI_SIZES = (1, 2, 3)
MPI_TIMEOUT = 400
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()


def _cfg(out, *extra):
    return config.load(None, ["data.dataset=digits", "model.hidden=[16, 12]", "run.batch_size=0",
                              f'run.out="{out}"', "run.log_every=5", "run.eval_every=10",
                              "data.eval_samples=200", "algorithm.rho=0.01", "algorithm.nu=0.01"]
                       + list(extra))


def _final_state(out, name, step):
    with GraphComm(WORLD, T.complete(N)) as gc:
        state, _ = CheckpointStore(f"{out}/{name}/checkpoints", gc).load(step)
    return state["algo"]


@pytest.mark.parametrize("algo", ["pdadmm", "pdadmm-q"])
def test_resume_is_bitwise(shared_tmp, algo):
    extra = [f'algorithm.name="{algo}"', "run.steps=20", "run.checkpoint_every=10", "algorithm.rho_raise=true",
             "algorithm.rho_tol=1e-3"]
    if algo == "pdadmm-q":
        extra.append("algorithm.quantize_p=true")
    straight = train(_cfg(shared_tmp, *extra, "run.name=straight"), WORLD)
    first = train(_cfg(shared_tmp, *extra, "run.name=resumed"), WORLD, max_steps=10)
    assert_all(first["step"] == 10 and first["stop"] == "max_steps", f"first leg {first}")
    second = train(_cfg(shared_tmp, *extra, "run.name=resumed", "run.resume=auto"), WORLD)
    assert_all(second["step"] == 20, f"second leg {second}")
    a, b = _final_state(shared_tmp, "straight", 20), _final_state(shared_tmp, "resumed", 20)
    same = all(np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True) for k in a)
    assert_all(same, f"{algo}: 10 + resume 10 differs from 20 straight")
    assert_all(straight["test_acc"] == second["test_acc"], "final metrics differ")
    assert_all(straight["test_acc"] > 0.3, f"{algo} did not learn: test acc {straight['test_acc']}")


def test_bad_inputs_are_one_error_everywhere(shared_tmp):
    if N >= 3:
        assert_raises_all(MpidlError, train, _cfg(shared_tmp, "algorithm.name=pdadmm", "model.hidden=[8]"),
                          WORLD, match="at most one rank per layer")
    assert_raises_all(MpidlError, train, _cfg(shared_tmp, "algorithm.name=pdadmm", "model.name=cnn"),
                      WORLD, match="trains an MLP")
    assert_raises_all(MpidlError, train, _cfg(shared_tmp, "algorithm.name=pdadmm", "model.hidden=[100000000, 8]"),
                      WORLD, match="GiB")
    assert_raises_all(MpidlError, train, _cfg(shared_tmp, "algorithm.name=pdadmm", "run.batch_size=32"),
                      WORLD, match="full batch")
    for bad, match in (("algorithm.rho=0.0", "rho must be > 0"), ("algorithm.nu=-1.0", "nu must be > 0"),
                       ("algorithm.grid_points=1", "cannot hold"), ("algorithm.grid_hi=-0.5", "cannot hold")):
        assert_raises_all(MpidlError, config.load_collective, WORLD, None,
                          ["algorithm.name=pdadmm-q", bad], match=match)


def _pool2(x):
    """2 x 2 average pooling of (N, C, H, W) images, flattened (plain NumPy loops)."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, h // 2, w // 2))
    for i in range(2):
        for j in range(2):
            out += x[:, :, i::2, j::2].astype(np.float64) / 4
    return out.reshape(n, -1)


def _ce_acc(logits, y):
    m = logits.max(axis=1)
    ce = m + np.log(np.exp(logits - m[:, None]).sum(axis=1)) - logits[np.arange(len(y)), y]
    return ce.mean(), (logits.argmax(axis=1) == y).mean()


@pytest.mark.parametrize("hidden,n_ev", [([16, 12], 200), ([12], 1)], ids=["hidden0", "hidden1"])
def test_session_steps_and_evaluation_match_numpy(hidden, n_ev):
    """The layer layout through its session: the widths, the blocks, the data each rank gets and the
    start weights give the stacked reference's iterates, and evaluate() reports the CE and accuracy of a
    plain NumPy forward pass of the gathered weights (test set, first eval_samples training samples:
    200, and 1, where a mean over max(n, 2) would halve the training figures)."""
    import torch

    from mpidl.algorithms.pdadmm_layout import setup_layers
    from mpidl.data import load_dataset
    from mpidl.models import build_model
    from reference import pdadmm as ref
    L = len(hidden) + 1
    if N > L:
        pytest.skip("more ranks than layers")
    cfg = config.load(None, ["data.dataset=digits", f"model.hidden={hidden}", "model.dtype=float64",
                             "run.batch_size=0", "run.seed=2", f"data.eval_samples={n_ev}", "algorithm.name=pdadmm",
                             "algorithm.downsample=2", "algorithm.rho=0.5", "algorithm.nu=0.8", "algorithm.tau0=0.5",
                             "algorithm.max_doublings=6", "algorithm.fista_iters=20", "algorithm.fista_tol=1e-12"])
    ds = load_dataset("digits", None, seed=0)
    X, Xt = _pool2(ds.x_train), _pool2(ds.x_test)
    dims = [16] + hidden + [10]
    lins = [m for m in build_model("mlp", (16,), 10, tuple(hidden), seed=2).modules() if isinstance(m, torch.nn.Linear)]
    Ws = [m.weight.detach().numpy().astype(np.float64) for m in lins]
    bs = [m.bias.detach().numpy().astype(np.float64) for m in lins]
    S, costs, _ = ref.run(X, ds.y_train, Ws, bs, ref.hyper(PdADMMConfig(**{
        k: getattr(cfg.algorithm, k) for k in ("rho", "nu", "tau0", "max_doublings", "fista_iters", "fista_tol")})), 3)
    sizes = [L // N + (1 if r < L % N else 0) for r in range(N)]
    l0 = sum(sizes[:R])
    s = setup_layers(cfg, WORLD)
    try:
        assert_all(s.dims == dims and s.L == L and (s.l0, s.l1) == (l0, l0 + sizes[R]), f"{s.dims} {s.l0} {s.l1}")
        assert_all(s.expect == {"algorithm": "pdadmm", "rank_layout": f"layers:{N}", "dims": ",".join(map(str, dims))})
        assert_all(s.comm is s.gc and s.oracle is None and s.steps_per_epoch == 1 and s.dtype == np.float64)
        assert_all(s.algo.N == len(X) and s.algo.cfg is cfg.algorithm and s.state.W.dtype == np.float64)
        assert_all(s.describe().endswith(f"MLP {dims} (L={L}), {len(X)} samples full batch, rho=0.5, nu=0.8"),
                   s.describe())
        losses = []
        for k in range(3):
            s.state, m = s.algo.step(k, s.state, s.oracle, s.comm)
            losses.append(m["loss"])
        wb = {}
        for d in WORLD.allgather({lay.l: (lay.W.copy(), lay.b.copy()) for lay in s.algo._layers}):
            wb.update(d)
        err = max(float(np.abs(wb[l][i] - S[k][l]).max()) for l in range(L) for i, k in enumerate("Wb"))
        assert_all(err < 1e-10, f"weights deviate from the stacked reference by {err:.3e}")
        assert_all(np.allclose(losses, costs, rtol=1e-10, atol=0) if s.l1 == L else losses == [None] * 3,
                   f"{losses} vs {costs}")
        ev, _ = s.evaluate(s.state)
        logits = ref.forward(np.concatenate([Xt, X[:n_ev]]), S["W"], S["b"])
        nt = len(Xt)
        want = dict(zip(("test_loss", "test_acc"), _ce_acc(logits[:nt], ds.y_test)))
        want.update(zip(("train_loss_forward", "train_acc_forward"), _ce_acc(logits[nt:], ds.y_train[:n_ev])))
        bad = {k: (ev[k], v) for k, v in want.items() if not abs(ev[k] - v) <= 1e-10 * max(1.0, abs(v))}
        assert_all(not bad and 0.0 < want["test_acc"] < 1.0, f"evaluate vs NumPy: {bad}")
        assert_all(ev["rho"] == 0.5, f"{ev}")
        assert_all(s.summary(ev) == f"forward pass through {N} layer rank(s); train acc {want['train_acc_forward']:.4f}")
        s.state.rejected[:, 0] = R + 1               # distinct counts per rank and kind: the sums over ranks
        s.state.rejected[:, 1] = 10 * (R + 1)
        if s.l1 == L:                                # training labels = the predictions: accuracy exactly 1
            s.y_eval[nt:] = logits[nt:].argmax(axis=1)
        ev, _ = s.evaluate(s.state)
        p_want = sum((r + 1) * sizes[r] for r in range(N))
        assert_all(ev["rejected_p_steps"] == p_want and ev["rejected_W_steps"] == 10 * p_want, f"{ev}")
        assert_all(ev["train_acc_forward"] == 1.0 and ev["test_acc"] == want["test_acc"], f"{ev}")
        comms = (s.mc, s.gc, s.ec)
        s.close()
        assert_all(all(c._closed for c in comms) and s.mc is s.gc is s.ec is None, "close() left a communicator")
    finally:
        s.close()


def test_session_on_binary_and_regression_data():
    """Two classes are a classification problem (synthetic-logistic: an MLP 20-4-4-2); regression targets
    (synthetic-lsq, no classes) and a data folder without the files are one clear error on every rank."""
    from mpidl.algorithms.pdadmm_layout import PdADMMError, setup_layers
    if N > 3:
        pytest.skip("three layers")
    base = ["model.hidden=[4, 4]", "run.batch_size=0", "algorithm.name=pdadmm"]
    s = setup_layers(config.load(None, base + ["data.dataset=synthetic-logistic"]), WORLD)
    try:
        assert_all(s.dims == [20, 4, 4, 2], f"{s.dims}")
    finally:
        s.close()
    assert_raises_all(PdADMMError, setup_layers, config.load(None, base + ["data.dataset=synthetic-lsq"]), WORLD,
                      match="needs a classification dataset, 'synthetic-lsq' has none")
    # one class is no classification problem either (no dataset of mpidl has one: built here)
    import dataclasses
    from mpidl import data as D
    real = D.load_dataset
    one = dataclasses.replace(real("synthetic-logistic", None, seed=0), num_classes=1)
    D.load_dataset = lambda *a, **k: one
    try:
        assert_raises_all(PdADMMError, setup_layers, config.load(None, base + ["data.dataset=synthetic-logistic"]),
                          WORLD, match="needs a classification dataset")
    finally:
        D.load_dataset = real
    # the configured data folder is the one searched (the error names it); config.load checks the
    # folder exists, so the layout's own search is reached with paths=False
    missing = "/nonexistent/mpidl-pdadmm-data"
    sets = base + ["data.dataset=fashion-mnist", f'data.data_dir="{missing}"']
    assert_raises_all(MpidlError, config.load, None, sets, match=f"data_dir '{missing}' is not a folder")
    assert_raises_all(MpidlError, setup_layers, config.load(None, sets, paths=False), WORLD,
                      match=f"file {missing}/")
