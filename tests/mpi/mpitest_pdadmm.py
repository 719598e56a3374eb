"""pdADMM under MPI: the layer-parallel run equals the stacked single-process reference
(tests/reference/pdadmm.py) at every world size, with and without quantisation, and the
augmented Lagrangian decreases."""
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import topology as T
from mpidl.algorithms.pdadmm import PdADMM, PdADMMConfig, layer_blocks
from mpidl.comm import GraphComm
from reference import pdadmm as ref

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 400
WORLD = MPI.COMM_WORLD
P, R = WORLD.Get_size(), WORLD.Get_rank()
DIMS = {3: [6, 5, 4, 3], 4: [6, 4, 6, 5, 3], 5: [6, 5, 4, 5, 4, 3]}     # 4: layer 1 widens (not "narrow")


_problem, _hp = ref.problem, ref.hyper


def _run_mpi(cfg, dims, X, y, Ws, bs, iters, each=None):
    l0, l1 = layer_blocks(len(dims) - 1, P)[R]
    algo = PdADMM(cfg, dims=dims, n_samples=len(y), rank=R, size=P, dtype=np.float64,
                  X=X if l0 == 0 else None, y=y if l1 == len(dims) - 1 else None)
    with GraphComm(WORLD, T.path(P)) as gc:
        state = algo.init((Ws[l0:l1], bs[l0:l1]), gc)
        gc.reset_counters()                       # count the iterations' traffic only
        losses = []
        for k in range(iters):
            state, m = algo.step(k, state, None, gc)
            losses.append(m["loss"])
            if each is not None:
                each(k, algo, state)
        nbytes = gc.bytes_sent
    return algo, state, losses, nbytes


def _gather(algo, state):
    """Rank-ordered per-layer dict of W, b, z, p, q, u (on every rank)."""
    algo.weights(state)
    u = algo.duals(state)
    mine = {lay.l: {"W": lay.W.copy(), "b": lay.b.copy(), "z": lay.z.copy(),
                    "p": None if lay.l == 0 else np.array(algo.as_float(lay.p)),   # quantised: stored
                    "q": None if lay.q is None else np.array(algo.as_float(lay.q)),   # as grid indices
                    "u": u.get(lay.l)} for lay in algo._layers}
    if algo.u_in is not None:
        mine["u_in"] = (algo.l0 - 1, algo.u_in.copy())
    out = {}
    for d in WORLD.allgather(mine):
        out.update(d)
    return out


def _max_rel_dev(g, S):
    """Largest deviation of the gathered per-layer states ``g`` from the reference ``S``, relative
    to max(1, |reference|), over W, b, z, p (layers >= 1), q and u."""
    return max(float(np.abs(g[l][k] - S[k][l]).max() / max(1.0, np.abs(S[k][l]).max()))
               for k in ("W", "b", "z", "p", "q", "u") for l in range(len(S[k]))
               if S[k][l] is not None and not (k == "p" and l == 0))


def _stacked(g, L):
    S = {"W": [g[l]["W"] for l in range(L)], "b": [g[l]["b"] for l in range(L)],
         "z": [g[l]["z"] for l in range(L)], "p": [None] + [g[l]["p"] for l in range(1, L)],
         "q": [g[l]["q"] for l in range(L - 1)], "u": [g[l]["u"] for l in range(L - 1)]}
    return S


CASES = [dict(), dict(quantize=True), dict(quantize=True, quantize_p=True),
         dict(mu=0.05, rho_raise=True, rho_tol=10.0, rho_max=4.0)]


@pytest.mark.parametrize("L", [3, 4, 5])
@pytest.mark.parametrize("opts", CASES, ids=["plain", "q", "qp", "mu-rho-raise"])
def test_layer_parallel_equals_stacked_reference(L, opts):
    dims = DIMS[L]
    if P > L:
        pytest.skip("more ranks than layers: see test_too_many_ranks")
    cfg = PdADMMConfig(rho=0.5, nu=0.8, tau0=0.5, max_doublings=6, fista_iters=20, fista_tol=1e-12, **opts)
    X, y, Ws, bs = _problem(dims)
    algo, state, losses, _ = _run_mpi(cfg, dims, X, y, Ws, bs, 8)
    S, costs, rhos = ref.run(X, y, Ws, bs, _hp(cfg), 8)
    g = _gather(algo, state)
    err = 0.0
    for key in ("W", "b", "z", "p", "q", "u"):
        for l, want in enumerate(S[key]):
            if want is None or (key == "p" and l == 0):
                continue
            err = max(err, float(np.abs(g[l][key] - want).max() / max(1.0, np.abs(want).max())))
    if "u_in" in g:
        lb, u = g["u_in"]
        err = max(err, float(np.abs(u - S["u"][lb]).max()))
    assert_all(err < 1e-10, f"max relative deviation from the stacked reference {err:.3e}")
    if algo.l1 == L:
        assert_all(np.allclose(losses, costs, rtol=1e-10, atol=0), f"{losses} vs {costs}")
    else:
        assert_all(all(v is None for v in losses))
    assert_all(state.rho == pytest.approx(rhos[-1] if not cfg.rho_raise else
                                          ref.raise_rho(costs, rhos[-1], cfg.rho_factor, cfg.rho_max,
                                                        cfg.rho_tol)))
    if cfg.rho_raise:
        assert_all(rhos[-1] > cfg.rho, "rho_raise never raised rho in this test")
    if cfg.quantize:
        grid = np.linspace(cfg.grid_lo, cfg.grid_hi, cfg.grid_points)
        q = np.concatenate([S["q"][l].ravel() for l in range(L - 1)])
        assert_all(np.abs(q[:, None] - grid[None, :]).min(axis=1).max() < 1e-12, "q off the grid")


def _six_steps_equal_reference(dims, seed, opts):
    cfg = PdADMMConfig(rho=0.5, nu=0.8, tau0=0.5, max_doublings=6, fista_iters=20, fista_tol=1e-12, **opts)
    X, y, Ws, bs = _problem(dims, seed=seed)
    algo, state, _, _ = _run_mpi(cfg, dims, X, y, Ws, bs, 6)
    S, _, _ = ref.run(X, y, Ws, bs, _hp(cfg), 6)
    err = _max_rel_dev(_gather(algo, state), S)
    assert_all(err < 1e-10, f"max relative deviation from the stacked reference {err:.3e}")


@pytest.mark.parametrize("opts", [dict(), dict(quantize=True, quantize_p=True)], ids=["plain", "qp"])
def test_row_blocked_gemms_equal_reference(monkeypatch, opts):
    # blocks of 7 rows for 40 samples: G written over R block by block, two-pass narrow p steps
    from mpidl.algorithms import pdadmm as mod
    monkeypatch.setattr(mod, "_ROWS", 7)
    dims = [6, 5, 4, 5, 4, 3]
    if P > 5:
        pytest.skip("more ranks than layers")
    _six_steps_equal_reference(dims, 2, opts)


@pytest.mark.parametrize("quantize", [False, True])
def test_bytes_per_iteration(quantize):
    dims = DIMS[3]
    if P > 3:
        pytest.skip("more ranks than layers")
    cfg = PdADMMConfig(quantize=quantize, quantize_p=quantize)
    X, y, Ws, bs = _problem(dims)
    algo, _, _, nbytes = _run_mpi(cfg, dims, X, y, Ws, bs, 3)
    n = len(y)
    width = dims
    want = 0
    if algo.l0 > 0:
        want += n * width[algo.l0] * (2 if quantize else 8)          # p to the previous rank
    if algo.l1 < 3:
        want += n * width[algo.l1] * (2 if quantize else 8)          # q to the next rank
    assert_all(nbytes == 3 * want, f"{nbytes} bytes, expected {3 * want}")


def test_rejected_w_steps_are_counted():
    """tau0 far below every W step's curvature and no doubling allowed: each W step fails the
    sufficient-decrease test (t >= g^T H g / ||g||^2), so W never moves and every layer counts one
    rejected W step per iteration after the first (the counts behind the reported
    rejected_W_steps). At k = 0 the W gradient is 0: z starts at p W^T + b, so the residual
    R = z - p W^T - b is 0 and the zero step is accepted."""
    dims = DIMS[3]
    if P > 3:
        pytest.skip("more ranks than layers")
    cfg = PdADMMConfig(tau0=1e-12, max_doublings=0)
    X, y, Ws, bs = _problem(dims)
    algo, state, _, _ = _run_mpi(cfg, dims, X, y, Ws, bs, 3)
    g = _gather(algo, state)
    assert_all(all(np.array_equal(g[l]["W"], Ws[l]) for l in range(3)), "a rejected W step moved W")
    assert_all(state.rejected[:, 1].tolist() == [2] * (algo.l1 - algo.l0),
               f"rejected W steps {state.rejected[:, 1].tolist()}, expected 2 per layer")
    # the p steps likewise: at k = 0 the p gradient is 0 (R = 0, p = q, u = 0), after that every
    # p step is rejected, so p keeps its forward-pass value and layers l >= 1 count 2 rejections
    S0 = ref.init(X, Ws, bs)
    assert_all(all(np.array_equal(g[l]["p"], S0["p"][l]) for l in range(1, 3)), "a rejected p step moved p")
    want = [0 if l == 0 else 2 for l in range(algo.l0, algo.l1)]
    assert_all(state.rejected[:, 0].tolist() == want, f"rejected p steps {state.rejected[:, 0].tolist()}, "
                                                      f"expected {want}")


@pytest.mark.parametrize("opts", [dict(), dict(quantize=True, quantize_p=True)], ids=["plain", "qp"])
def test_equal_width_layers_equal_reference(opts):
    """Layers with n_in == n_out (5 -> 5 at l = 1, 2): the wide-layer p step (G over R), which the
    DIMS cases reach only with n_in < n_out."""
    dims = [6, 5, 5, 5, 3]
    if P > 4:
        pytest.skip("more ranks than layers")
    _six_steps_equal_reference(dims, 4, opts)


def test_rho_raise_decisions_use_the_last_layers_cost():
    """rho_raise with a rho_tol at which the reference raises rho at some iterations and not at others:
    every rank must take the cost of the last layer's rank (a broadcast) to make the same choices."""
    dims = DIMS[4]
    if P > 4:
        pytest.skip("more ranks than layers")
    X, y, Ws, bs = _problem(dims, seed=5)
    for tol in (0.03, 0.1, 0.3):
        cfg = PdADMMConfig(rho=0.05, nu=0.8, tau0=0.5, max_doublings=6, fista_iters=20, fista_tol=1e-12,
                           rho_raise=True, rho_factor=2.0, rho_max=10.0, rho_tol=tol)
        S, costs, rhos = ref.run(X, y, Ws, bs, _hp(cfg), 8)
        rho = ref.raise_rho(costs, rhos[-1], cfg.rho_factor, cfg.rho_max, cfg.rho_tol)
        raises = sum(b > a for a, b in zip(rhos + [rho], (rhos + [rho])[1:]))
        if 0 < raises < 6:
            break
    assert_all(0 < raises < 6, f"no rho_tol gives a mixed raise pattern: {rhos}")
    algo, state, _, _ = _run_mpi(cfg, dims, X, y, Ws, bs, 8)
    g = _gather(algo, state)
    err = _max_rel_dev(g, S)
    assert_all(err < 1e-10 and state.rho == rho, f"rho {state.rho} vs {rho} (tol {tol}, reference {rhos}), "
                                                 f"max relative deviation {err:.3e}")


def test_step_on_a_restored_state_equals_reference():
    """A state with new arrays (as a resume restores it) after 3 iterations: the next 3 iterations must
    update that state, not the arrays the layer views were bound to before."""
    import dataclasses
    dims = DIMS[3]
    if P > 3:
        pytest.skip("more ranks than layers")
    cfg = PdADMMConfig(rho=0.5, nu=0.8, tau0=0.5, max_doublings=6, fista_iters=20, fista_tol=1e-12)
    X, y, Ws, bs = _problem(dims, seed=6)
    l0, l1 = layer_blocks(3, P)[R]
    algo = PdADMM(cfg, dims=dims, n_samples=len(y), rank=R, size=P, dtype=np.float64,
                  X=X if l0 == 0 else None, y=y if l1 == 3 else None)
    with GraphComm(WORLD, T.path(P)) as gc:
        state = algo.init((Ws[l0:l1], bs[l0:l1]), gc)
        for k in range(3):
            state, _ = algo.step(k, state, None, gc)
        state = dataclasses.replace(state, **{f.name: getattr(state, f.name).copy()
                                              for f in dataclasses.fields(state)
                                              if isinstance(getattr(state, f.name), np.ndarray)})
        for k in range(3, 6):
            state, _ = algo.step(k, state, None, gc)
    S, _, _ = ref.run(X, y, Ws, bs, _hp(cfg), 6)
    g = _gather(algo, state)
    err = _max_rel_dev(g, S)
    assert_all(err < 1e-10, f"max relative deviation from the stacked reference {err:.3e}")


class _OneRankPath:
    """The path communicator of a one-rank block: the cost broadcast from rank 0 has nothing to do."""

    def bcast(self, buf, root):
        assert root == 0


def test_rho_raise_follows_the_cost_history():
    """rho <- min(factor rho, rho_max) exactly when the cost fell by < rho_tol in each of the last two
    iterations, against reference.pdadmm.raise_rho on a scripted cost series: big then small drops,
    a drop of exactly rho_tol (not < tol), a rise (counts as stalled), and the cap."""
    cfg = PdADMMConfig(rho=0.01, rho_raise=True, rho_factor=4.0, rho_max=0.5, rho_tol=0.25)
    algo = PdADMM(cfg, dims=[2, 2], n_samples=1, rank=0, size=1)
    state = algo.state_cls(*(np.zeros(0),) * 9, tau_p=np.zeros(1), tau_W=np.zeros(1),
                           rejected=np.zeros((1, 2), np.int64), costs=np.full(3, np.nan), rho=cfg.rho)
    # drops 4, 1/8, 7/8, 1/8, 1/8, 1/4, 1/4, 1/4, -1/8, 1/8, 1, 1/8, ... (tol = 1/4, exact in binary):
    # consecutive pairs (<, <), (<, =), (=, <), (=, =), (<, >), (>, <), a rise, and rho reaches the cap
    series = [8.0, 4.0, 3.875, 3.0, 2.875, 2.75, 2.5, 2.25, 2.0, 2.125, 2.0, 1.0, 0.875, 0.75, 0.625, 0.5]
    costs, rho, got, want = [], cfg.rho, [], []
    for c in series:
        state.loss = c
        algo._raise_rho(state, _OneRankPath())
        costs.append(c)
        rho = ref.raise_rho(costs, rho, cfg.rho_factor, cfg.rho_max, cfg.rho_tol)
        got.append(state.rho)
        want.append(rho)
    assert_all(got == want, f"rho {got}, expected {want}")
    assert_all(len(set(want)) >= 4 and want[-1] == cfg.rho_max, f"the series does not exercise the rule: {want}")


@pytest.mark.parametrize("L", [3, 5])
def test_augmented_lagrangian_decreases(L):
    dims = DIMS[L]
    if P > L:
        pytest.skip("more ranks than layers")
    cfg = PdADMMConfig(rho=2.0, nu=1.0, tau0=1.0, fista_iters=100, fista_tol=0.0)
    X, y, Ws, bs = _problem(dims, seed=3)
    vals = []

    def record(k, algo, state):
        S = _stacked(_gather(algo, state), L)
        S["p"][0] = X
        vals.append(ref.augmented_lagrangian(S, y, cfg.nu, state.rho))
    _run_mpi(cfg, dims, X, y, Ws, bs, 20, each=record)
    d = np.diff(vals)
    assert_all(np.all(d <= 1e-9 * np.abs(vals[:-1])), f"AL increased: {vals}")
    assert_all(vals[-1] < vals[0])


def test_too_many_ranks():
    if P < 3:
        pytest.skip("needs more ranks than layers (2 layers at 3+ ranks)")
    assert_raises_all(ValueError, layer_blocks, 2, P, match="at most one rank per layer")
