"""Synchronous LSGD (single and multi-leader) and EASGD under MPI equal the stacked references."""
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import config
from mpidl.algorithms.base import lr_at
from mpidl.algorithms.lsgd import LSGD
from mpidl.comm import GraphComm
from mpidl.errors import MpidlError
from mpidl import topology as T
from reference import lsgd as ref
from reference.oracles import make_problem

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 300
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
STEPS = 26


def _run(name, overrides, steps=STEPS, on_step=None, oracle=None):
    cfg = config.load(None, [f"algorithm.name={name}"] + overrides).algorithm
    factory = config.algorithm_registry()[name][1]
    oracles, x0, spe = make_problem(N)
    algo = factory(cfg, steps_per_epoch=spe)
    with GraphComm(W, T.ring(N)) as gc:
        state = algo.init(x0.copy(), gc)
        for k in range(steps):
            state, m = algo.step(k, state, oracle or oracles[R], gc)
            if on_step is not None:
                on_step(k, state, m)
        algo.close()
    assert_all(np.isfinite(m["loss"]), "loss finite")
    return state, oracles, x0, (lambda t: lr_at(cfg, t, spe)), algo


def _close(x, X, what, tol=1e-10):
    err = np.abs(x - X[R]).max()
    assert_all(err < tol, f"{what}: max |mpi - reference| = {err:.3e}")


SINGLE = ["algorithm.lr=0.1", "algorithm.tau_G=3", "algorithm.window=4", "algorithm.lam_G=0.3"]


@pytest.mark.parametrize("extra", [[], ["algorithm.step_pull=false"],
                                   ["algorithm.momentum=0.8", "algorithm.weight_decay=0.01", "algorithm.p2=0.5",
                                    "algorithm.lr_schedule=diminishing"]])
def test_lsgd_single_leader_matches_reference(extra):
    state, oracles, x0, lr, algo = _run("lsgd", SINGLE + extra)
    c = algo.cfg
    X = ref.lsgd(x0, oracles, STEPS, lr, lam=c.lam, lam_G=c.lam_G, tau=c.tau, tau_G=c.tau_G, window=c.window,
                 step_pull=c.step_pull, p1=None if c.p1 == -1 else c.p1, p2=None if c.p2 == -1 else c.p2,
                 mu=c.momentum, wd=c.weight_decay)
    _close(state.x, X, f"lsgd {extra}")


def _groups(size):
    return [list(range(s, s + size)) for s in range(0, N, size)]


@pytest.mark.parametrize("how", ["size", "node", "size1", "pulls-only", "tau3"])
def test_lsgd_multi_leader_matches_reference(how):
    gs = 2 if N % 2 == 0 else N
    extra = ["algorithm.groups=size", f"algorithm.group_size={gs}"]
    groups = _groups(gs)
    if how == "node":       # the test job runs on one node: one group of everybody
        extra, groups = ["algorithm.groups=node"], [list(range(N))]
    elif how == "size1":
        extra, groups = ["algorithm.groups=size", "algorithm.group_size=1"], _groups(1)
    elif how == "pulls-only":
        extra += ["algorithm.step_pull=false"]
    tau = 3 if how == "tau3" else 2         # local elections at (t + 1) % tau == 0, not (t - 1)
    base = ["algorithm.lr=0.1", f"algorithm.tau={tau}", "algorithm.tau_G=5", "algorithm.window=3",
            "algorithm.lam=0.2", "algorithm.lam_G=0.4", "algorithm.momentum=0.5"]
    state, oracles, x0, lr, algo = _run("lsgd", base + extra)
    c = algo.cfg
    X = ref.lsgd(x0, oracles, STEPS, lr, lam=c.lam, lam_G=c.lam_G, tau=c.tau, tau_G=c.tau_G, window=c.window,
                 groups=groups, step_pull=c.step_pull, mu=c.momentum)
    _close(state.x, X, f"multi-leader lsgd {how}")
    assert_all(algo.lc is None, "close() frees the communicators")


@pytest.mark.parametrize("extra", [["algorithm.tau=1"], ["algorithm.tau=3"],
                                   ["algorithm.tau=2", "algorithm.momentum=0.7", "algorithm.beta=0.9",
                                    "algorithm.weight_decay=0.01"]])
def test_easgd_matches_reference(extra):
    state, oracles, x0, lr, algo = _run("easgd", ["algorithm.lr=0.1"] + extra)
    c = algo.cfg
    X, cen = ref.easgd(x0, oracles, STEPS, lr, beta=c.beta, tau=c.tau, mu=c.momentum, wd=c.weight_decay)
    _close(state.x, X, f"easgd {extra}")
    err = np.abs(state.c - cen).max()
    assert_all(err < 1e-10, f"easgd center: {err:.3e}")


def test_zero_pulls_equal_independent_sgd():
    for extra in (["algorithm.lam_G=0.0"],
                  ["algorithm.groups=size", "algorithm.group_size=1", "algorithm.lam=0.0", "algorithm.lam_G=0.0"]):
        state, oracles, x0, lr, _ = _run("lsgd", ["algorithm.lr=0.1", "algorithm.tau_G=2", "algorithm.tau=1",
                                                  "algorithm.momentum=0.5"] + extra)
        xs = ref.sgd(x0, oracles[R], STEPS, lr, mu=0.5)
        assert_all(np.abs(state.x - xs).max() < 1e-12, f"lambda = lambda_G = 0 is not SGD ({extra})")


def test_single_worker_equals_sgd():
    if N != 1:
        pytest.skip("N = 1 only")
    for extra in ([], ["algorithm.groups=size", "algorithm.group_size=1", "algorithm.tau=1"],
                  ["algorithm.asynchronous=true", "algorithm.tau_G=2"]):
        state, oracles, x0, lr, _ = _run("lsgd", ["algorithm.lr=0.1", "algorithm.tau_G=3"] + extra)
        xs = ref.sgd(x0, oracles[0], STEPS, lr)
        assert_all(np.abs(state.x - xs).max() < 1e-12, f"lsgd at N=1 != SGD ({extra})")


class _ScriptedOracle:
    """Loss drawn from a seeded RNG per (rank, step), so the leader changes often; gradient
    depends on x and the rank, so the workers' models differ."""

    dim = 6

    def loss_grad(self, x, k):
        loss = float(np.random.default_rng((R, k)).uniform())
        return loss, 0.1 * (x - R)


def test_elected_leader_is_argmin_of_windowed_losses():
    """Independent of the reference: every rank keeps its own loss history from the step
    metrics, the test allgathers the windowed means and takes the argmin; right after a global
    election the elected worker's model is the stored leader copy on every rank."""
    window, tau_G = 3, 2
    hist, checked, leaders = [], [], []

    def on_step(k, state, m):
        hist.append(m["loss"])
        mine = LSGD.windowed_loss(state)        # also before the window has filled
        assert_all(abs(mine - np.mean(hist[-window:])) < 1e-12, f"step {k}: windowed loss {mine} != "
                   f"mean of the last {window} step losses {np.mean(hist[-window:])}")
        if (k + 1) % tau_G:
            return
        f = np.array(W.allgather(float(np.mean(hist[-window:]))))
        want = int(np.flatnonzero(f == f.min())[0])
        xs = np.array(W.allgather(state.x.copy()))
        cgs = np.array(W.allgather(state.cg.copy()))
        ok = (state.lead_g == want and np.array_equal(xs[want], state.cg)
              and all(np.array_equal(cg, cgs[0]) for cg in cgs))
        checked.append(ok)
        leaders.append(want)

    _run("lsgd", ["algorithm.lr=0.1", f"algorithm.tau_G={tau_G}", f"algorithm.window={window}",
                  "algorithm.lam_G=0.3"], on_step=on_step, oracle=_ScriptedOracle())
    assert_all(len(checked) == STEPS // tau_G and all(checked), f"leader checks {checked}")
    assert_all(N == 1 or len(set(leaders)) > 1, f"the leader never changed ({leaders}): a weak check")


def test_sync_leader_model_is_the_lowest_windowed_loss_workers_model():
    """The model the driver evaluates: the worker with the lowest windowed loss now (ties to the
    lowest rank), its parameters broadcast to every rank of the control communicator."""
    state, *_, algo = _run("lsgd", SINGLE, steps=7, oracle=_ScriptedOracle())
    f = np.array(W.allgather(LSGD.windowed_loss(state)))
    want = int(np.flatnonzero(f == f.min())[0])
    xs = np.array(W.allgather(state.x.copy()))
    buf = np.full_like(state.x, np.nan)
    with GraphComm(W, T.ring(N)) as mc:
        owner = algo.leader_model(state, mc, buf)
    assert_all(owner == want and np.array_equal(buf, xs[want]), f"leader {owner}, want {want} (f = {f})")


def test_elections_match_reference_record():
    rec = []
    state, oracles, x0, lr, algo = _run("lsgd", SINGLE)
    c = algo.cfg
    ref.lsgd(x0, oracles, STEPS, lr, lam=c.lam, lam_G=c.lam_G, tau=c.tau, tau_G=c.tau_G, window=c.window,
             record=rec)
    assert_all(state.lead_g == rec[-1][1], f"last leader {state.lead_g} != reference {rec[-1][1]}")


def test_group_size_that_does_not_divide_is_one_error_everywhere():
    if N < 2:
        pytest.skip("every size divides 1")
    cfg = config.load(None, ["algorithm.name=lsgd", "algorithm.groups=size", f"algorithm.group_size={N + 1}"])
    algo = config.algorithm_registry()["lsgd"][1](cfg.algorithm)
    with GraphComm(W, T.ring(N)) as gc:
        assert_raises_all(MpidlError, algo.init, np.zeros(3), gc, match="does not divide")


@pytest.mark.parametrize("bad,match", [("lam=1.0", "lam must lie"), ("lam_G=-0.1", "lam_G must lie"),
                                       ("tau=0", "tau must be"), ("tau_G=0", "tau_G must be"),
                                       ("groups=\"rack\"", "groups must be")])
def test_bad_hyper_parameters_are_one_error_everywhere(bad, match):
    assert_raises_all(MpidlError, config.load_collective, W, None, ["algorithm.name=lsgd", f"algorithm.{bad}"],
                      match=match)


def test_easgd_bad_tau():
    assert_raises_all(MpidlError, config.load_collective, W, None, ["algorithm.name=easgd", "algorithm.tau=0"],
                      match="tau must be")
