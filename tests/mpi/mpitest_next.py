"""NEXT under MPI: equals the stacked reference, tracks gradients exactly, and on convex
problems every agent converges to the centralized minimiser."""
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all
from mpidl import config
from mpidl import topology as T
from mpidl.comm import GraphComm
from mpidl.algorithms.next import NEXTState
from mpidl.oracles import ConvexOracle
from mpiutil import agent_data
from reference.convex import ConvexRef
from reference.next import fista, next_stacked, soft
from reference.oracles import make_problem

MPI_SIZES = (1, 2, 3, 4)
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()


def _algo(overrides):
    cfg = config.load(None, ["algorithm.name=next"] + overrides).algorithm
    return config.algorithm_registry()["next"][1](cfg), cfg


def _logistic_problem(d=6, m=30, seed=0):
    """(mpidl ConvexOracles, independent NumPy oracles of the same shards, Lipschitz constant)."""
    rng = np.random.default_rng(seed)
    wt = rng.standard_normal(d)
    oracles, refs = [], []
    for i in range(N):
        X = rng.standard_normal((m + 5 * i, d)) + 0.3 * i        # heterogeneous shards
        y = (X @ wt + rng.standard_normal(len(X)) > 0).astype(float)
        oracles.append(ConvexOracle(X, y, "logistic"))
        refs.append(ConvexRef(X, y, "logistic"))
    L = sum(np.linalg.norm(r.X, 2) ** 2 / (4 * r.n) for r in refs)
    return oracles, refs, L


def _topology():
    return T.erdos_renyi(N, 0.6, seed=1) if N > 2 else T.ring(N)


def _run(algo, topo, oracle, x0, steps, check=None):
    with GraphComm(WORLD, topo) as gc:
        state = algo.init(x0.copy(), gc)
        for k in range(steps):
            state, m = algo.step(k, state, oracle, gc)
            if check is not None:
                check(k, state, gc)
        metrics = algo.social_metrics(state, oracle, gc)
    return state, metrics


@pytest.mark.parametrize("reg,blocks", [("l2", 1), ("l1", 1), ("none", 3), ("l1", 4)])
def test_next_linear_matches_stacked_reference(reg, blocks):
    oracles, x0, spe = make_problem(N, batch=8)
    topo = T.exponential(N)
    algo, cfg = _algo([f"algorithm.reg={reg}", "algorithm.lam=0.05", "algorithm.tau=4.0",
                       "algorithm.alpha0=0.8", "algorithm.eps=0.05", f"algorithm.blocks={blocks}"])
    state, _ = _run(algo, topo, oracles[R], x0, 15)
    X, Y = next_stacked(topo.weights, x0, oracles, 15, 4.0, 0.8, 0.05, reg, 0.05)
    err = max(np.abs(state.x - X[R]).max(), np.abs(state.y - Y[R]).max())
    assert_all(err < 1e-10, f"NEXT {reg}: max |mpi - reference| = {err:.3e}")


@pytest.mark.parametrize("blocks", [1, 2])
def test_next_gauss_newton_matches_exact_reference(blocks):
    """blocks = 2: the block-Jacobi surrogate (two column blocks solved apart), not the full one."""
    oracles, x0, spe = make_problem(N, batch=8, nonlinear=False)
    for o in oracles:
        o.residual_jacobian = (lambda o: lambda x, k: _lsq_jac(o, x, k))(o)
    topo = T.ring(N)
    algo, cfg = _algo(["algorithm.surrogate=gauss-newton", "algorithm.reg=l2", "algorithm.lam=0.01",
                       "algorithm.tau=1.0", "algorithm.inner_iters=200", "algorithm.inner_tol=1e-14",
                       f"algorithm.blocks={blocks}"])
    state, _ = _run(algo, topo, oracles[R], x0, 10)
    X, _ = next_stacked(topo.weights, x0, oracles, 10, 1.0, 0.5, 0.01, "l2", 0.01, surrogate="gauss-newton",
                        blocks=blocks)
    err = np.abs(state.x - X[R]).max()
    assert_all(err < 1e-9, f"NEXT Gauss-Newton ({blocks} blocks): max |mpi - reference| = {err:.3e}")
    if blocks > 1:      # the block-Jacobi and the full surrogate really differ on this problem
        Xf, _ = next_stacked(topo.weights, x0, oracles, 10, 1.0, 0.5, 0.01, "l2", 0.01, surrogate="gauss-newton")
        assert_all(np.abs(Xf - X).max() > 1e-6, "block-Jacobi == full GN: the test cannot tell them apart")


@pytest.mark.parametrize("surrogate,blocks", [("linear", 1), ("linear", 3), ("gauss-newton", 1),
                                               ("gauss-newton", 2)])
def test_inner_iterations_reported(surrogate, blocks):
    """The step's "inner_iters": 0 for the closed form; the CG steps taken (here exactly inner_iters
    = 3, since tol = 0 never stops it early) for Gauss-Newton, the most over the blocks."""
    oracles, x0, spe = make_problem(N, batch=8, nonlinear=False)
    for o in oracles:
        o.residual_jacobian = (lambda o: lambda x, k: _lsq_jac(o, x, k))(o)
    algo, _ = _algo([f"algorithm.surrogate={surrogate}", f"algorithm.blocks={blocks}", "algorithm.inner_iters=3",
                     "algorithm.inner_tol=0.0"])
    seen = []
    with GraphComm(WORLD, T.ring(N)) as gc:
        state = algo.init(x0.copy(), gc)
        for k in range(3):
            state, m = algo.step(k, state, oracles[R], gc)
            seen.append(m["inner_iters"])
    want = 0 if surrogate == "linear" else 3
    assert_all(seen == [want] * 3, f"{surrogate}: inner_iters {seen}, expected {want} every step")


def _lsq_jac(o, x, k):
    from reference.convex import batch_indices
    idx = batch_indices(o.A.shape[0], o.batch, o.spe, o.seed, o.rank, k)
    A = o.A[idx]
    return A, A @ x - o.b[idx], len(idx)


def test_tracking_invariant_every_iteration():
    oracles, x0, spe = make_problem(N, batch=8)
    algo, _ = _algo(["algorithm.reg=l1", "algorithm.lam=0.05", "algorithm.tau=4.0"])
    worst = [0.0]

    def check(k, state, gc):
        ybar = gc.allreduce(state.y, op="mean")
        gbar = gc.allreduce(state.g, op="mean")
        worst[0] = max(worst[0], float(np.abs(ybar - gbar).max()))

    _, m = _run(algo, T.ring(N), oracles[R], x0, 25, check)
    assert_all(worst[0] < 1e-12, f"mean y - mean grad reached {worst[0]:.3e}")
    assert_all(m["tracking_error"] < 1e-12, f"tracking_error metric {m['tracking_error']:.3e}")


@pytest.mark.parametrize("reg,lam", [("l2", 0.01), ("l1", 0.1)])
def test_convex_exactness_logistic(reg, lam):
    oracles, refs, L = _logistic_problem()
    d = refs[0].dim
    # the centralized minimiser from the independent NumPy oracle (not the ConvexOracle NEXT uses)
    xs = fista(lambda w: sum(r.full_loss_grad(w)[1] for r in refs), L, np.zeros(d), reg, lam)
    algo, _ = _algo([f"algorithm.reg={reg}", f"algorithm.lam={lam}", f"algorithm.tau={L}",
                     "algorithm.alpha0=1.0", "algorithm.eps=0.001"])
    state, m = _run(algo, _topology(), oracles[R], np.zeros(d), 600)
    rel = np.linalg.norm(state.x - xs) / np.linalg.norm(xs)
    assert_all(rel < 1e-6, f"{reg}: agent {R} is {rel:.3e} (relative) from the centralized minimiser")
    assert_all(m["consensus_error"] < 1e-8 and m["stationarity"] < 1e-6, f"metrics {m}")
    if reg == "l1":
        assert_all(np.array_equal(state.x == 0, xs == 0) and (xs == 0).any(),
                   f"sparsity pattern {state.x == 0} != {xs == 0}")


def test_single_agent_is_the_local_method():
    """N = 1: pi = 0, y = grad, so NEXT is the proximal-gradient-type local method."""
    if N != 1:
        pytest.skip("N = 1 only")
    oracles, x0, spe = make_problem(1, batch=8)
    algo, _ = _algo(["algorithm.reg=l1", "algorithm.lam=0.05", "algorithm.tau=4.0", "algorithm.eps=0.0",
                     "algorithm.alpha0=1.0"])
    state, _ = _run(algo, T.ring(1), oracles[0], x0, 10)
    x = x0.copy()
    for k in range(10):
        _, g = oracles[0].loss_grad(x.copy(), k)
        v = x - g / 4.0
        x = np.sign(v) * np.maximum(np.abs(v) - 0.05 / 4.0, 0)
    assert_all(np.abs(state.x - x).max() < 1e-12, "N=1 NEXT != proximal gradient")


def _stacked_social_metrics(Wx, Y, G, refs, tau, reg, lam):
    """The social-problem metrics of NEXT, from the stacked states, in plain NumPy."""
    wbar = Wx.mean(0)
    F = sum(r.full_loss_grad(wbar)[0] for r in refs)
    gF = sum(r.full_loss_grad(wbar)[1] for r in refs)
    reg_val = {"l1": lam * np.abs(wbar).sum(), "l2": lam * wbar @ wbar, "none": 0.0}[reg]
    v = wbar - gF / tau
    p = {"l1": soft(v, lam / tau), "l2": v / (1 + 2 * lam / tau), "none": v}[reg]
    return {"objective": F + reg_val, "stationarity": tau * np.linalg.norm(wbar - p),
            "consensus_error": np.sqrt(np.mean(np.sum((Wx - wbar) ** 2, axis=1))),
            "tracking_error": np.linalg.norm(Y.mean(0) - G.mean(0)), "sparsity": np.mean(wbar == 0.0)}


@pytest.mark.parametrize("reg", ["l1", "l2", "none"])
def test_social_metrics_match_stacked_computation(reg):
    """Arbitrary per-agent states (so every metric is far from 0): social_metrics must equal the
    same quantities computed from the stacked states with the independent NumPy oracle."""
    oracles, refs, _ = _logistic_problem()
    d = refs[0].dim
    Wx, Y, G = agent_data(N, (d,), np.float64, seed=21), agent_data(N, (d,), np.float64, seed=22), \
        agent_data(N, (d,), np.float64, seed=23)
    Wx[:, 0] = 0.0 if reg == "l1" else Wx[:, 0]        # a zero coordinate of the average
    tau, lam = 3.0, 0.2
    algo, _ = _algo([f"algorithm.reg={reg}", f"algorithm.lam={lam}", f"algorithm.tau={tau}"])
    state = NEXTState(wy=np.concatenate([Wx[R], Y[R]]), g=G[R].copy(), alpha=0.37, ready=True)
    with GraphComm(WORLD, _topology()) as gc:
        algo.init(np.zeros(d), gc)
        m = algo.social_metrics(state, oracles[R], gc)
    expect = _stacked_social_metrics(Wx, Y, G, refs, tau, reg, lam)
    expect["alpha"] = 0.37
    bad = {k: (m[k], v) for k, v in expect.items() if not abs(m[k] - v) <= 1e-10 * max(1.0, abs(v))}
    assert_all(not bad, f"{reg}: metric(s) differ from the stacked computation: {bad}")
    assert_all(expect["tracking_error"] > 0.1 and (N == 1 or expect["consensus_error"] > 0.1),
               "the test states must make the metrics nonzero")


def test_social_metrics_along_a_run_match_stacked_reference():
    """After 12 NEXT iterations on the stacked reference's problem, the reported metrics equal the
    ones computed from the reference's X, Y and gradients (consensus error is not 0 here)."""
    oracles, refs, L = _logistic_problem()
    d, steps, reg, lam = refs[0].dim, 12, "l1", 0.05
    algo, _ = _algo([f"algorithm.reg={reg}", f"algorithm.lam={lam}", f"algorithm.tau={L}", "algorithm.alpha0=0.9"])
    topo = T.path(N)                                    # not W = 1/N: consensus is not exact
    state, m = _run(algo, topo, oracles[R], np.zeros(d), steps)
    last = {}
    X, Y = next_stacked(topo.weights, np.zeros(d), refs, steps, L, 0.9, 0.01, reg, lam,
                        trace=lambda k, X, Y, G: last.update(G=G.copy()))
    expect = _stacked_social_metrics(X, Y, last["G"], refs, L, reg, lam)
    bad = {k: (m[k], v) for k, v in expect.items() if not abs(m[k] - v) <= 1e-9 * max(1e-3, abs(v))}
    assert_all(not bad, f"metric(s) differ from the stacked reference: {bad}")
    assert_all(N < 3 or expect["consensus_error"] > 1e-6, f"consensus error {expect['consensus_error']}")
