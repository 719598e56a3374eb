"""CDSGD family under MPI equals the stacked-matrix reference (float64, 1e-10)."""
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all
from mpidl import config
from mpidl import topology as T
from mpidl.comm import GraphComm
from reference import cdsgd as ref
from reference.oracles import make_problem

MPI_SIZES = (1, 2, 3, 4)
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
STEPS = 12


def _run(algo_name, topo, overrides, sizes=None, steps=STEPS, context=True):
    cfg = config.load(None, [f"algorithm.name={algo_name}"] + overrides).algorithm
    factory = config.algorithm_registry()[algo_name][1]
    oracles, x0, spe = make_problem(N, sizes=sizes)
    algo = (factory(cfg, steps_per_epoch=spe, num_samples=oracles[R].A.shape[0]) if context
            else factory(cfg))                          # the documented defaults: 1 and 1
    with GraphComm(W, topo) as gc:
        state = algo.init(x0.copy(), gc)
        for k in range(steps):
            state, m = algo.step(k, state, oracles[R], gc)
        assert_all(np.isfinite(m["loss"]), "loss finite")
    lr = ref.lr_of(cfg, spe)  # independent of mpidl's lr_at
    return state.x, oracles, x0, lr, cfg


def _close(x, X, what):
    err = np.abs(x - X[R]).max()
    assert_all(err < 1e-10, f"{what}: max |mpi - reference| = {err:.3e}")


# spe = 5 steps per epoch: the step schedule (step_epochs=1) decays at k = 5 and 10
SCHEDULES = {"constant": ["algorithm.lr_schedule=constant"],
             "diminishing": ["algorithm.lr_schedule=diminishing", "algorithm.decay=0.3", "algorithm.power=0.75"],
             "step": ["algorithm.lr_schedule=step", "algorithm.decay=0.5", "algorithm.step_epochs=1.0"]}


@pytest.mark.parametrize("form,period,schedule", [("cta", 1, "diminishing"), ("atc", 1, "step"),
                                                  ("cta", 3, "constant"), ("cta", 1, "step")])
def test_cdsgd_matches_reference(form, period, schedule):
    topo = T.ring(N)
    x, oracles, x0, lr, cfg = _run("cdsgd", topo, [f"algorithm.form={form}", f"algorithm.comm_period={period}",
                                                   "algorithm.lr=0.1", "algorithm.weight_decay=0.01"]
                                   + SCHEDULES[schedule])
    _close(x, ref.cdsgd(topo.weights, x0, oracles, STEPS, lr, 0.01, period, form),
           f"cdsgd {form} c={period} {schedule}")


@pytest.mark.parametrize("form,schedule", [("nesterov", "constant"), ("heavy-ball", "step")])
def test_cdmsgd_matches_reference(form, schedule):
    topo = T.exponential(N)
    x, oracles, x0, lr, cfg = _run("cdmsgd", topo, [f"algorithm.momentum_form={form}", "algorithm.lr=0.05",
                                                    "algorithm.momentum=0.9"] + SCHEDULES[schedule])
    _close(x, ref.cdmsgd(topo.weights, x0, oracles, STEPS, lr, 0.9, form), f"cdmsgd {form} {schedule}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_centralized_matches_reference(nesterov):
    x, oracles, x0, lr, cfg = _run("centralized", T.ring(N), ["algorithm.lr=0.1", "algorithm.momentum=0.5",
                                                              *(["algorithm.nesterov=true"] if nesterov else [])]
                                   + SCHEDULES["diminishing" if nesterov else "step"])
    _close(x, ref.centralized(x0, oracles, STEPS, lr, 0.5, nesterov), "centralized")


def test_fedavg_matches_reference_with_unequal_sizes():
    sizes = [40 + 8 * i for i in range(N)]
    x, oracles, x0, lr, cfg = _run("fedavg", T.ring(N), ["algorithm.lr=0.1", "algorithm.local_steps=4"]
                                   + SCHEDULES["diminishing"], sizes)
    _close(x, ref.fedavg(x0, oracles, STEPS, lr, 4, sizes), "fedavg")


def test_cdsgd_complete_graph_atc_equals_centralized_sgd():
    """W = 1/N, adapt-then-combine: every agent follows centralized SGD exactly."""
    x, oracles, x0, lr, _ = _run("cdsgd", T.complete(N), ["algorithm.form=atc", "algorithm.lr=0.1"])
    xc, *_ = _run("centralized", T.complete(N), ["algorithm.lr=0.1"])
    assert_all(np.abs(x - xc).max() < 1e-12, "ATC CDSGD on complete(N) != centralized SGD")
    # all agents agree
    assert_all(np.abs(x - W.bcast(x, root=0)).max() < 1e-12, "agents disagree")


def test_cdsgd_complete_graph_cta_average_follows_averaged_gradient():
    """W = 1/N, paper form: from the MPI states X after STEPS steps, one more MPI step must give
    x_i = mean_j x_j - lr g_i(x_i) on every agent, so the mean moves by -lr * mean_i g_i(x_i)."""
    lr_on = ["algorithm.lr=0.1", "algorithm.lr_schedule=diminishing"]
    x, oracles, x0, lr, cfg = _run("cdsgd", T.complete(N), lr_on)
    x1, *_ = _run("cdsgd", T.complete(N), lr_on, steps=STEPS + 1)
    X = np.stack(W.allgather(x))
    G = np.stack([o.loss_grad(X[i].copy(), STEPS)[1].copy() for i, o in enumerate(oracles)])
    expect = X.mean(0) - lr(STEPS) * G[R]
    assert_all(np.abs(x1 - expect).max() < 1e-12, "one CTA step on complete(N) != mean - lr g_i")
    X1 = np.stack(W.allgather(x1))
    assert_all(np.abs(X1.mean(0) - (X.mean(0) - lr(STEPS) * G.mean(0))).max() < 1e-12, "average dynamics")
    _close(x, ref.cdsgd(T.complete(N).weights, x0, oracles, STEPS, lr), "cdsgd complete")


@pytest.mark.parametrize("epochs,E", [(0.4, 2), (0.1, 1), (0.7, 4)])
def test_fedavg_local_epochs(epochs, E):
    """local_epochs > 0 overrides local_steps: E = max(1, round(local_epochs * steps_per_epoch)),
    here with 5 steps per epoch."""
    sizes = [40 + 8 * i for i in range(N)]
    x, oracles, x0, lr, cfg = _run("fedavg", T.ring(N), ["algorithm.lr=0.1", "algorithm.local_steps=7",
                                                         f"algorithm.local_epochs={epochs}"], sizes)
    _close(x, ref.fedavg(x0, oracles, STEPS, lr, E, sizes), f"fedavg local_epochs={epochs} (E={E})")


def test_defaults_without_context():
    """Built without steps_per_epoch / num_samples: one step per epoch, equal FedAvg weights."""
    x, oracles, x0, _, cfg = _run("cdsgd", T.ring(N), ["algorithm.lr=0.1"] + SCHEDULES["step"], context=False)
    _close(x, ref.cdsgd(T.ring(N).weights, x0, oracles, STEPS, ref.lr_of(cfg, 1)), "cdsgd, 1 step per epoch")
    sizes = [40 + 8 * i for i in range(N)]
    x, oracles, x0, lr, _ = _run("fedavg", T.ring(N), ["algorithm.lr=0.1", "algorithm.local_steps=3"], sizes,
                                 context=False)
    _close(x, ref.fedavg(x0, oracles, STEPS, lr, 3, [1] * N), "fedavg, equal weights")
    x, oracles, x0, lr, _ = _run("fedavg", T.ring(N), ["algorithm.lr=0.1", "algorithm.local_epochs=2.0"],
                                 context=False)
    _close(x, ref.fedavg(x0, oracles, STEPS, lr, 2, [1] * N), "fedavg, 2 epochs of 1 step")


def test_fedavg_default_local_steps_is_10():
    sizes = [40 + 8 * i for i in range(N)]
    x, oracles, x0, lr, _ = _run("fedavg", T.ring(N), ["algorithm.lr=0.1"], sizes)
    _close(x, ref.fedavg(x0, oracles, STEPS, lr, 10, sizes), "fedavg with the default local_steps")


@pytest.mark.parametrize("name,overrides,ok", [
    ("cdmsgd", ["algorithm.momentum=1.0"], False), ("cdmsgd", ["algorithm.momentum=-0.1"], False),
    ("cdmsgd", ["algorithm.momentum=0.0"], True),
    ("cdmsgd", [], True), ("centralized", [], True), ("fedavg", [], True), ("cdsgd", [], True),  # defaults
    ("centralized", ["algorithm.momentum=1.5"], False), ("centralized", ["algorithm.momentum=1.0"], False),
    ("centralized", ["algorithm.momentum=-0.1"], False), ("centralized", ["algorithm.momentum=0.0"], True),
    ("fedavg", ["algorithm.local_steps=0", "algorithm.local_epochs=0.5"], True),
    ("fedavg", ["algorithm.local_steps=0", "algorithm.local_epochs=0.0"], False),
    ("cdsgd", ["algorithm.comm_period=0"], False), ("cdsgd", ["algorithm.comm_period=1"], True),
    ("cdsgd", ["algorithm.form=xyz"], False),
    ("cdmsgd", ["algorithm.momentum_form=xyz"], False),
])
def test_config_validation(name, overrides, ok):
    try:
        config.load(None, [f"algorithm.name={name}"] + overrides)
        got = True
    except config.ConfigError:
        got = False
    assert_all(got == ok, f"{name} {overrides}: accepted={got}, expected {ok}")


def test_fedavg_one_local_step_equals_minibatch_sgd():
    x, oracles, x0, lr, _ = _run("fedavg", T.ring(N), ["algorithm.lr=0.1", "algorithm.local_steps=1"])
    xc, *_ = _run("centralized", T.ring(N), ["algorithm.lr=0.1"])
    assert_all(np.abs(x - xc).max() < 1e-12, "FedAvg(E=1) != minibatch SGD")


def test_single_agent_reduces_to_sgd():
    if N != 1:
        pytest.skip("N = 1 only")
    for name in ("cdsgd", "cdmsgd", "fedavg", "centralized"):
        extra = ["algorithm.momentum=0.0"] if name in ("cdmsgd",) else []
        x, oracles, x0, lr, _ = _run(name, T.ring(1), ["algorithm.lr=0.1"] + extra)
        xs = ref.sgd(x0, oracles[0], STEPS, lr)
        assert_all(np.abs(x - xs).max() < 1e-12, f"{name} at N=1 != SGD")
