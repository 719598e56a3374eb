"""Decoupled pipeline (fdg) on M x K grids: equals the stacked reference, K = 1 equals centralized SGD,
staleness 2 (K - 1 - k) with gradients exactly at the stashed weights, bitwise resume, error paths."""
import copy

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import config
from mpidl import topology as T
from mpidl.algorithms.base import lr_at, state_from_dict, state_to_dict
from mpidl.algorithms.fdg_grid import setup_grid
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.data import load_agent_data
from mpidl.driver import train
from mpidl.errors import MpidlError
from mpidl.models import build_model
from reference import fdg as ref

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 600
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
GRIDS = {1: [(1, 1)], 2: [(1, 2), (2, 1)], 3: [(1, 3), (3, 1)], 4: [(2, 2), (1, 4)]}[N]
BASE = ["data.dataset=digits", "model.dtype=float64", "run.batch_size=16", "algorithm.name=fdg"]
torch.set_num_threads(1)


def _cfg(M, K, extra=(), hidden=(12, 10, 8), steps=14):
    return config.load(None, BASE + [f"algorithm.stages={K}", f"algorithm.replicas={M}", f"run.steps={steps}",
                                     f"model.hidden={list(hidden)}"] + list(extra))


def _run(cfg, steps, sess=None, state=None, start=0):
    sess = sess or setup_grid(cfg, W)
    state = state or sess.state
    for t in range(start, steps):
        state, _ = sess.algo.step(t, state, sess.oracle, sess.comm)
    return sess, state


def _ref_stages(cfg, K, cuts):
    """The test's own cut of the seeded MLP: unit u starts at the u-th Linear (Flatten rides with unit 0)."""
    shard = load_agent_data("digits")
    model = build_model("mlp", shard.input_shape, shard.num_classes, cfg.model.hidden, seed=cfg.run.seed).double()
    return ref.mlp_stages(model, cuts)


def _ref_batches(cfg, M, spe):
    shards = [load_agent_data("digits", rank=m, world_size=M) for m in range(M)]
    return ref.batches([(s.x, s.y) for s in shards], cfg.run.batch_size, spe, cfg.run.seed)


@pytest.mark.parametrize("M,K", GRIDS)
@pytest.mark.parametrize("extra", [
    ["algorithm.beta=0.5", "algorithm.momentum=0.9", "algorithm.weight_decay=0.001", "algorithm.lr=0.05",
     "algorithm.lr_schedule=diminishing"],
    ["algorithm.beta=1.0", "algorithm.momentum=0.5", "algorithm.nesterov=true", "algorithm.lr=0.1"],
    ["algorithm.momentum=0.0", "algorithm.lr=0.2"]])                  # plain SGD (not the default 0.9)
def test_matches_stacked_reference(M, K, extra):
    steps = 14
    cuts = tuple(range(1, K))
    cfg = _cfg(M, K, extra + [f"algorithm.cuts={list(cuts)}"])
    sess = setup_grid(cfg, W)
    x0 = sess.state.x.copy()
    sess, state = _run(cfg, steps, sess)
    a = cfg.algorithm
    Wref = ref.fdg(_ref_stages(cfg, K, cuts), _ref_batches(cfg, M, sess.steps_per_epoch), M, steps,
                   lambda t: lr_at(a, t, sess.steps_per_epoch), mu=a.momentum, nesterov=a.nesterov,
                   wd=a.weight_decay, beta=a.beta)
    err = np.abs(state.x - Wref[sess.comm.k]).max()
    moved = np.abs(state.x - x0).max() > 1e-6
    sess.close()
    assert_all(err < 1e-10 and moved, f"grid {M}x{K} stage: max |mpi - reference| = {err:.3e}")


def test_k1_equals_centralized():
    """K = 1 on N ranks (M = N replicas) is data-parallel SGD: mpidl's centralized algorithm, to 1e-12."""
    steps = 10
    extra = ["algorithm.momentum=0.9", "algorithm.weight_decay=0.001", "algorithm.lr=0.1"]
    sess, state = _run(_cfg(N, 1, extra, steps=steps), steps)
    ccfg = config.load(None, ["data.dataset=digits", "model.dtype=float64", "run.batch_size=16",
                              "algorithm.name=centralized", "model.hidden=[12, 10, 8]"] + extra)
    from mpidl.algorithms.cdsgd import Centralized
    from mpidl.flat import FlatModel
    from mpidl.oracles import TorchOracle
    shard = load_agent_data("digits", rank=R, world_size=N)
    fm = FlatModel(build_model("mlp", shard.input_shape, shard.num_classes, (12, 10, 8), seed=0), torch.float64)
    with GraphComm(W, T.complete(N)) as gc:
        spe = int(gc.allreduce(len(shard.y) // 16, op="min"))
        oracle = TorchOracle(fm, shard.x, shard.y, batch_size=16, steps_per_epoch=spe, rank=R)
        algo = Centralized(ccfg.algorithm, steps_per_epoch=spe)
        cst = algo.init(fm.x, gc)
        for k in range(steps):
            cst, _ = algo.step(k, cst, oracle, gc)
    err = np.abs(state.x - cst.x).max()
    sess.close()
    assert_all(spe == sess.steps_per_epoch and err < 1e-12, f"K=1 vs centralized: {err:.3e}")


@pytest.mark.parametrize("M,K", GRIDS)
def test_staleness_and_gradient_at_stashed_weights(M, K):
    """Instrumented: stage k backpropagates every batch exactly 2 (K - 1 - k) iterations after its forward,
    with the gradient of the weights that forward used (recomputed independently), not the live ones."""
    steps = 12
    cuts = tuple(range(1, K))
    cfg = _cfg(M, K, ["algorithm.momentum=0.9", "algorithm.lr=0.1", f"algorithm.cuts={list(cuts)}"], steps=steps)
    sess = setup_grid(cfg, W)
    algo, state, k = sess.algo, sess.state, sess.comm.k
    algo.trace = []
    hist, metrics = {-1: state.x.copy()}, {}
    for t in range(steps):
        state, metrics[t] = algo.step(t, state, sess.oracle, sess.comm)
        hist[t] = state.x.copy()
    fwd = {b: t for kind, t, b, *_ in algo.trace if kind == "fwd"}
    bwd = [(t, b, p) for kind, t, b, *p in algo.trace if kind == "bwd"]
    d = 2 * (K - 1 - k)
    stage = _ref_stages(cfg, K, cuts)[k]
    ok, worst, live_gap = True, 0.0, 0.0
    for t, b, (h, delta, gw) in bwd:
        t_fwd = fwd.get(b, t)  # the last stage forwards and backpropagates in the same iteration
        ok &= (t - t_fwd == d) and (k == K - 1 or b in fwd)
        w_used = hist[t_fwd] if k < K - 1 else hist[t - 1]  # non-last: after step t_fwd; last: before step t
        if k < K - 1:
            g_ref = ref.vjp_at(stage, w_used, h, delta)
            worst = max(worst, float(np.abs(g_ref - gw).max()))
            live_gap = max(live_gap, float(np.abs(ref.vjp_at(stage, hist[t - 1], h, delta) - gw).max()))
    expected = max(0, steps - 2 * (K - 1) - 0)  # batches fed = backward events per stage
    ok &= len(bwd) == expected and len(set(b for _, b, _ in bwd)) == expected
    # the step's loss / accuracy: the last stage's minibatch at the weights before its step, recomputed
    # here from the stage's input; the other stages report none
    labels = _ref_batches(cfg, M, sess.steps_per_epoch)
    mgap, reported = 0.0, {t for t, m in metrics.items() if m["loss"] is not None or m["acc"] is not None}
    if k == K - 1:
        mod = copy.deepcopy(stage)
        for t, b, (h, _, _) in bwd:
            torch.nn.utils.vector_to_parameters(torch.from_numpy(hist[t - 1].copy()), mod.parameters())
            with torch.no_grad():
                out = mod(torch.from_numpy(h))
            yb = labels(sess.comm.m, b)[1]
            acc = float((out.argmax(1) == yb).double().mean())
            loss = float(torch.nn.functional.cross_entropy(out, yb))
            mgap = max(mgap, abs(metrics[t]["loss"] - loss), abs(metrics[t]["acc"] - acc))
    want = {t for t, _, _ in bwd} if k == K - 1 else set()
    sess.close()
    assert_all(reported == want and mgap < 1e-12, f"stage {k}: loss/accuracy reported at iterations "
               f"{sorted(reported)} (expected {sorted(want)}), off the recomputed ones by {mgap:.3e}")
    assert_all(ok, f"stage {k} of {K}: staleness != {d} or wrong batch count ({len(bwd)} vs {expected})")
    assert_all(worst < 1e-12, f"stage {k}: gradient differs from the one at the stashed weights by {worst:.3e}")
    assert_all(k == K - 1 or live_gap > 1e-8, f"stage {k}: the live weights give the same gradient ({live_gap})")


@pytest.mark.parametrize("M,K", GRIDS)
def test_resume_from_state_is_bitwise(M, K):
    """Stop after 7 iterations, copy the state out, rebuild everything, continue: == 15 straight (bitwise).
    The graphs of in-flight batches are not in the state; the resumed run rebuilds them."""
    cfg = _cfg(M, K, ["algorithm.momentum=0.9", "algorithm.beta=0.7", f"algorithm.cuts={list(range(1, K))}"],
               steps=15)
    cfg32 = config.from_dict({**config.to_dict(cfg), "model": {**config.to_dict(cfg)["model"], "dtype": "float32"}})
    for c in (cfg, cfg32):
        sess, full = _run(c, 15)
        xs = full.x.copy()
        sess.close()
        sess, part = _run(c, 7)
        saved = {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in state_to_dict(part).items()}
        sess.close()
        sess = setup_grid(c, W)
        st = state_from_dict(sess.algo.state_cls, saved, like=sess.state)
        sess, st = _run(c, 15, sess, st, start=7)
        same = np.array_equal(st.x, xs)
        sess.close()
        assert_all(same, f"grid {M}x{K} {c.model.dtype}: resumed run differs")


def test_errors_on_every_rank():
    assert_raises_all(MpidlError, setup_grid, _cfg(0, N + 1), W, match="does not fit")
    if N >= 2:
        assert_raises_all(MpidlError, setup_grid, _cfg(1, N, ["model.name=linear"]), W, match="cuttable units")
    # a cut list of the wrong length or order is a config error (before any setup)
    assert_raises_all(MpidlError, config.load, None, BASE + ["algorithm.stages=1", "algorithm.cuts=[2]"],
                      match="cuts must list stages - 1 = 0")
    assert_raises_all(MpidlError, config.load, None, BASE + ["algorithm.stages=3", "algorithm.cuts=[2, 1]"],
                      match="cuts must be increasing")
    for beta in ("0.0", "1.5", "-1"):
        assert_raises_all(MpidlError, config.load, None, BASE + [f"algorithm.beta={beta}"], match="beta")
    if N >= 2:
        cfg = _cfg(1, N, [f"algorithm.cuts={list(range(9, 9 + N - 1))}"])   # valid form, past the 4 units
        assert_raises_all(MpidlError, setup_grid, cfg, W, match="does not fit")


def test_evaluation_matches_whole_model():
    """The whole-pipeline evaluation equals the unsliced model evaluated at the stages' weights."""
    M, K = GRIDS[0]
    cfg = _cfg(M, K, ["algorithm.lr=0.1"], steps=8)
    sess, state = _run(cfg, 8)
    ev, _ = sess.evaluate(state)
    ws = W.allgather((sess.comm.m, sess.comm.k, state.x.copy()))
    sess.close()
    shard = load_agent_data("digits")
    model = build_model("mlp", shard.input_shape, shard.num_classes, (12, 10, 8), seed=0).double()
    w = np.concatenate([x for m, k, x in sorted(ws, key=lambda e: (e[0], e[1])) if m == 0])
    torch.nn.utils.vector_to_parameters(torch.from_numpy(w), model.parameters())
    with torch.no_grad():
        out = model(torch.as_tensor(shard.x_test).double())
    acc = float((out.argmax(1) == torch.as_tensor(shard.y_test)).double().mean())
    loss = float(torch.nn.functional.cross_entropy(out, torch.as_tensor(shard.y_test).long()))
    assert_all(abs(ev["test_acc"] - acc) < 1e-12 and abs(ev["test_loss"] - loss) < 1e-10,
               f"pipeline eval {ev} != whole model ({acc}, {loss})")


# -- through the driver (mpidl.driver.train: the loop `mpidl run` uses) -------------------------------
def _dcfg(out, *extra):
    return config.load(None, ["data.dataset=digits", "model.hidden=[12, 10, 8]", "run.batch_size=16",
                              "model.dtype=float64", f'run.out="{out}"', "run.log_every=5", "run.eval_every=10",
                              "algorithm.lr=0.1", "algorithm.weight_decay=0.001"] + list(extra))


def _final_state(out, name, step):
    with GraphComm(W, T.complete(N)) as gc:
        state, _ = CheckpointStore(f"{out}/{name}/checkpoints", gc).load(step)
    return state


def test_driver_k1_equals_centralized(shared_tmp):
    """The whole `mpidl run` path: fdg with K = 1 on N ranks == centralized on N ranks, 1e-12 (float64)."""
    hp = ["algorithm.momentum=0.9", "run.steps=12", "run.checkpoint_every=12"]
    a = train(_dcfg(shared_tmp, "algorithm.name=fdg", "algorithm.stages=1", "run.name=fdg", *hp), W)
    b = train(_dcfg(shared_tmp, "algorithm.name=centralized", "topology.name=complete", "run.name=c", *hp), W)
    xa, xb = _final_state(shared_tmp, "fdg", 12)["algo"]["x"], _final_state(shared_tmp, "c", 12)["algo"]["x"]
    err = float(np.abs(np.asarray(xa) - np.asarray(xb)).max())
    assert_all(err < 1e-12 and abs(a["test_acc"] - b["test_acc"]) < 1e-12,
               f"fdg K=1 vs centralized: {err:.3e}, acc {a['test_acc']} vs {b['test_acc']}")


@pytest.mark.parametrize("M,K", GRIDS)
def test_driver_resume_is_bitwise(shared_tmp, M, K):
    """10 + resume 10 == 20 straight, bitwise, every state array (stashes and messages included)."""
    hp = ["algorithm.name=fdg", f"algorithm.stages={K}", f"algorithm.replicas={M}", "algorithm.momentum=0.9",
          "algorithm.beta=0.5", f"algorithm.cuts={list(range(1, K))}", "run.steps=20", "run.checkpoint_every=5",
          'model.dtype="float32"']
    straight = train(_dcfg(shared_tmp, *hp, "run.name=straight"), W)
    first = train(_dcfg(shared_tmp, *hp, "run.name=resumed"), W, max_steps=10)
    second = train(_dcfg(shared_tmp, *hp, "run.name=resumed", "run.resume=auto"), W)
    a, b = _final_state(shared_tmp, "straight", 20), _final_state(shared_tmp, "resumed", 20)
    same = all(np.array_equal(np.asarray(a["algo"][k]), np.asarray(b["algo"][k])) for k in a["algo"])
    assert_all(first["step"] == 10 and second["step"] == 20 and same
               and straight["test_acc"] == second["test_acc"], f"grid {M}x{K}: resumed run differs")
    mid = _final_state(shared_tmp, "resumed", 10)["algo"]
    k = R % K
    inflight = 2 * (K - 1 - k)
    assert_all(np.asarray(mid["w_stash"]).shape[0] == inflight and
               (inflight == 0 or np.abs(np.asarray(mid["w_stash"])).max() > 0), "stash not checkpointed")


def test_resume_reuses_the_checkpointed_cuts(shared_tmp):
    """A measured balance can change between runs: a resumed run takes the cuts from its checkpoint."""
    if N != 2:
        pytest.skip("1 x 2 grid")
    hp = ["algorithm.name=fdg", "algorithm.stages=2", "run.steps=4", "run.checkpoint_every=2", "run.name=cuts"]
    train(_dcfg(shared_tmp, *hp, "algorithm.cuts=[3]"), W, max_steps=2)
    sess = setup_grid(_dcfg(shared_tmp, *hp, "run.resume=auto"), W)
    cuts = sess.cuts
    sess.close()
    assert_all(tuple(cuts) == (3,), f"resumed with cuts {cuts}")
    res = train(_dcfg(shared_tmp, *hp, "run.resume=auto"), W)
    assert_all(res["step"] == 4, f"resume failed: {res}")


class _Head(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("resume_at", [None, 5])
def test_resnet20_with_batchnorm_matches_reference(resume_at):
    """ResNet-20 (BatchNorm in train mode) on a 1 x N pipeline: == the reference, 1e-10; also when the
    run stops at step 5 and a new session continues from the copied state and buffers (the resumed
    backward recomputes the in-flight graphs, which must not move the running statistics again)."""
    if N not in (2, 3):
        pytest.skip("1 x 2 and 1 x 3 grids")
    steps, cuts = 8, (4, 8)[:N - 1]
    cfg = config.load(None, BASE + [f"algorithm.stages={N}", f"algorithm.cuts={list(cuts)}", "model.name=resnet20",
                                    f"run.steps={steps}", "algorithm.momentum=0.9", "algorithm.lr=0.05",
                                    "algorithm.beta=0.5"])
    if resume_at is None:
        sess, state = _run(cfg, steps)
    else:
        sess, part = _run(cfg, resume_at)
        saved = {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in state_to_dict(part).items()}
        buffers = sess.extra_state()                      # copies (NumPy)
        sess.close()
        sess = setup_grid(cfg, W)
        sess.load_extra_state(buffers)
        state = state_from_dict(sess.algo.state_cls, saved, like=sess.state)
        sess, state = _run(cfg, steps, sess, state, start=resume_at)
    shard = load_agent_data("digits")
    model = build_model("resnet20", shard.input_shape, shard.num_classes, seed=0).double()
    units = [model.stem, *model.blocks, _Head(model.head)]
    bounds = (0, *cuts, len(units))
    stages = [torch.nn.Sequential(*units[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    a = cfg.algorithm
    bufs = []
    Wref = ref.fdg(stages, _ref_batches(cfg, 1, sess.steps_per_epoch), 1, steps, lambda t: a.lr,
                   mu=a.momentum, beta=a.beta, buffers=bufs)
    err = np.abs(state.x - Wref[sess.comm.k]).max()
    # BatchNorm running statistics (what evaluation uses): moved once per batch, at the forward
    want = bufs[0][sess.comm.k]
    mine = dict(sess.algo.fm.model.named_buffers())
    berr = max(float((mine[n].double() - want[n].double()).abs().max()) for n in want) if want else 0.0
    sess.close()
    assert_all(err < 1e-10, f"resnet20 1x{N}: max |mpi - reference| = {err:.3e}")
    assert_all(len(want) > 0 and mine.keys() == want.keys() and berr < 1e-10,
               f"resnet20 1x{N}: BatchNorm buffers off the reference by {berr:.3e}")
