"""Asynchronous LSGD / EASGD: RMA model windows are never read torn, a slowed worker does not
hang the run, EASGD's center loses no update, and async runs resume from a checkpoint."""
import time

import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all
from mpidl import config
from mpidl import topology as T
from mpidl.algorithms.base import lr_at
from mpidl.comm import GraphComm, LeaderComm
from mpidl.driver import train
from reference import lsgd as ref
from reference.oracles import make_problem

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 300
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()


def test_window_reads_are_never_torn_and_updates_never_lost():
    """Every rank hammers one window with writes of uniform models (value = header loss) and
    lock-free reads, checking each read model is uniform and matches its header; a second
    window gets K read-modify-write increments per rank, which must all survive.  The host
    first sleeps outside MPI: the others must not need it to make progress."""
    n, K = 200_000, 25
    with GraphComm(W, T.ring(N)) as gc:
        lc = LeaderComm(gc)
        win = lc.window(n, np.float64, "world")
        ctr = lc.window(n, np.float64, "world", init=np.zeros(n))
        x, out = np.empty(n), np.empty(n)
        if R == 0:
            time.sleep(0.5)
        bad, reads = 0, 0
        for i in range(K):
            v = float(R * 1000 + i + 1)
            x[...] = v
            win.exchange(x, v, R, i, lambda h: True, out)
            for _ in range(2):
                h = win.read(out)
                if h is not None:
                    reads += 1
                    bad += int(not (out[0] == h[1] and np.all(out == out[0])))
            ctr.update(lambda c: np.add(c, 1.0, out=c), out)
            h = ctr.read(out)
            bad += int(not np.all(out == out[0]))
        W.Barrier()
        final = np.empty(n)
        ctr.read(final)
        assert_all(bad == 0 and reads >= K, f"{bad} torn reads out of {reads}")
        assert_all(np.all(final == N * K), f"center lost updates: {final[:3]} != {N * K}")
        assert_all(win.writes == K and ctr.writes == K + (1 if R == 0 else 0),  # + the host's init
                   "write counts")
        lc.close()


class _Recording:
    """Wraps an oracle: remembers the sum of lr * g actually applied (constant lr, no momentum)."""

    def __init__(self, oracle, lr):
        self.o, self.lr, self.dim = oracle, lr, oracle.dim
        self.moved = np.zeros(oracle.dim)

    def loss_grad(self, x, k):
        loss, g = self.o.loss_grad(x, k)
        self.moved += self.lr * g
        return loss, g


def _loop(name, overrides, rounds, oracle_wrap=None):
    cfg = config.load(None, [f"algorithm.name={name}", "algorithm.asynchronous=true",
                             f"algorithm.slow_rank={N - 1}", "algorithm.slow_factor=3.0"] + overrides).algorithm
    factory = config.algorithm_registry()[name][1]
    oracles, x0, spe = make_problem(N)
    oracle = oracles[R] if oracle_wrap is None else oracle_wrap(oracles[R], cfg.lr)
    algo = factory(cfg, steps_per_epoch=spe)
    gc = GraphComm(W, T.ring(N))
    state = algo.init(x0.copy(), gc)
    losses, local_steps = [], 0
    for k in range(rounds):
        state, m = algo.step(k, state, oracle, gc)
        losses.append(m["loss"])
        local_steps += m["local_steps"]         # this round's local steps, as reported
        # a worker enters the round's nonblocking barrier after round_steps local steps
        assert_all(m["local_steps"] >= cfg.round_steps, f"round {k}: {m['local_steps']} local steps "
                   f"< round_steps {cfg.round_steps}")
    return algo, state, gc, oracle, x0, losses, local_steps


@pytest.mark.parametrize("extra", [[], ["algorithm.groups=size", "algorithm.group_size=1", "algorithm.tau=2"],
                                   ["algorithm.groups=node", "algorithm.tau=1", "algorithm.momentum=0.5"],
                                   ["algorithm.round_steps=3"]])
def test_async_lsgd_with_a_slow_worker_runs_to_completion(extra):
    rounds = 12
    algo, state, gc, _, _, losses, local_steps = _loop("lsgd", ["algorithm.lr=0.05", "algorithm.tau_G=2"] + extra,
                                                       rounds)
    steps = W.allgather(local_steps)
    assert_all(all(np.isfinite(losses)) and state.t == local_steps >= rounds,
               f"rounds {rounds}, local steps {steps}")
    # every worker read or published a leader; the published leader is a real worker's model
    buf = np.empty_like(state.x)
    owner = algo.leader_model(state, gc, buf)
    assert_all(0 <= owner < N and state.have_g == 1 and np.all(np.isfinite(buf)), f"leader {owner}")
    if R == 0:
        print(f"async lsgd {extra}: local steps per worker {steps} in {rounds} rounds "
              f"(worker {N - 1} slowed 3x), leader {owner}")
    algo.close()
    gc.close()


def test_async_easgd_center_loses_no_update():
    """x_i <- x_i - a (x_i - c), c <- c + a (x_i - c) conserve sum_i x_i + c, so at the end
    sum_i x_i + c = (N + 1) x0 - sum_i sum_t lr g_i,t whatever the interleaving."""
    rounds = 15
    algo, state, gc, oracle, x0, losses, local_steps = _loop(
        "easgd", ["algorithm.lr=0.05", "algorithm.tau=1", "algorithm.beta=0.9"], rounds, _Recording)
    c = algo.center_model(state, gc, np.empty_like(state.x))
    total = gc.allreduce(state.x.copy()) + c
    want = (N + 1) * x0 - gc.allreduce(oracle.moved.copy())
    err = np.abs(total - want).max()
    # the host also wrote the initial center (restoring the window's contents is not a write)
    writes = algo.win_c.writes - (1 if R == 0 else 0)
    assert_all(err < 1e-10 and writes == local_steps == state.t, f"conservation error {err:.3e}, {writes} writes")
    algo.close()
    gc.close()


@pytest.mark.parametrize("name,extra", [("lsgd", ["algorithm.tau_G=2", "algorithm.groups=size",
                                                 "algorithm.group_size=1"]),
                                        ("easgd", ["algorithm.tau=2"])])
def test_async_run_resumes_from_checkpoint(shared_tmp, name, extra):
    base = ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16", f'run.out="{shared_tmp}"',
            "run.log_every=2", "run.eval_every=4", "data.eval_samples=100", f"algorithm.name={name}",
            "algorithm.asynchronous=true", "run.steps=8", "run.checkpoint_every=4", "run.name=a",
            f"algorithm.slow_rank={N - 1}", "algorithm.slow_factor=2.0"] + extra
    first = train(config.load(None, base), W, max_steps=4)
    assert_all(first["step"] == 4 and first["stop"] == "max_steps", f"first leg {first}")
    second = train(config.load(None, base + ["run.resume=auto"]), W)
    assert_all(second["step"] == 8 and second["stop"] == "done" and np.isfinite(second["test_acc"]),
               f"second leg {second}")
    col = "center_test_acc" if name == "easgd" else "leader_test_acc"
    assert_all(0.0 <= second[col] <= 1.0, f"eval column {col} missing or out of range: {second.get(col)}")


# -- serialised schedules against the stacked references -------------------------------------
class _ShuffledLoss:
    """A least-squares oracle whose reported loss is drawn per (worker, step), so the windowed
    losses cross and the published leader changes hands."""

    def __init__(self, oracle, i, ties=False):
        self.o, self.i, self.dim, self.ties = oracle, i, oracle.dim, ties

    def loss_grad(self, x, k):
        _, g = self.o.loss_grad(x, k)
        return 0.5 if self.ties else float(np.random.default_rng((7, self.i, k)).uniform()), g


def _serialised(name, overrides, steps, before=None, ties=False):
    """Run the asynchronous algorithm with ``deterministic = true``: one local step per round,
    the window accesses of each step in rank order (worker 0's, then worker 1's, ...), which
    makes the interleaving, and so the result, that of the serial references."""
    cfg = config.load(None, [f"algorithm.name={name}", "algorithm.asynchronous=true",
                             "algorithm.deterministic=true"] + overrides).algorithm
    factory = config.algorithm_registry()[name][1]
    oracles, x0, spe = make_problem(N)
    oracles = [_ShuffledLoss(o, i, ties) for i, o in enumerate(oracles)]
    algo = factory(cfg, steps_per_epoch=spe)
    gc = GraphComm(W, T.ring(N))
    state = algo.init(x0.copy(), gc)
    if before is not None:
        before(state)
    for t in range(steps):
        state, m = algo.step(t, state, oracles[R], gc)
        assert_all(m["local_steps"] == 1, f"deterministic round {t}: {m['local_steps']} local steps, not 1")
    return algo, state, gc, oracles, x0, (lambda t: lr_at(cfg, t, spe))


def _groups(size):
    return [list(range(s, min(s + size, N))) for s in range(0, N, size)]


@pytest.mark.parametrize("how", ["single", "multi", "no-step-pull", "ties"])
def test_serialised_async_lsgd_matches_reference(how):
    """"ties": every loss is equal, so the first publisher (worker 0) keeps the global slot: a
    worker publishes only on a strictly lower windowed loss (or when it owns the slot)."""
    steps = 13
    gs = 2 if N % 2 == 0 else N
    over = ["algorithm.lr=0.1", "algorithm.tau_G=2", "algorithm.window=3", "algorithm.lam_G=0.3",
            "algorithm.momentum=0.5", "algorithm.weight_decay=0.01", "algorithm.p2=0.4"]
    groups = None
    if how != "single":
        over += ["algorithm.groups=size", f"algorithm.group_size={gs}", "algorithm.tau=3", "algorithm.lam=0.2"]
        groups = _groups(gs)
    if how == "no-step-pull":
        over += ["algorithm.step_pull=false", "algorithm.lr_schedule=diminishing"]
    algo, state, gc, oracles, x0, lr = _serialised("lsgd", over, steps, ties=how == "ties")
    c = algo.cfg
    owners = []
    X, CG, CL, slot_g, lead_g, lead_l = ref.lsgd_async_serial(
        x0, oracles, steps, lr, lam=c.lam, lam_G=c.lam_G, tau=c.tau, tau_G=c.tau_G, window=c.window,
        groups=groups, step_pull=c.step_pull, p2=0.4, mu=c.momentum, wd=c.weight_decay, record=owners)
    err = max(np.abs(state.x - X[R]).max(), np.abs(state.cg - CG[R]).max())
    assert_all(err < 1e-10, f"serialised async lsgd {how}: max |mpi - reference| = {err:.3e}")
    assert_all(state.lead_g == lead_g[R] and state.t == steps and state.have_g == 1,
               f"leader {state.lead_g} != reference {lead_g[R]}")
    if groups is not None:
        lerr = np.abs(state.cl - CL[R]).max()
        assert_all(state.lead_l == lead_l[R] and lerr < 1e-10,
                   f"local leader {state.lead_l} (reference {lead_l[R]}), copy {lerr:.3e}")
    buf = np.empty_like(state.x)
    traffic = (gc.bytes_sent, gc.messages_sent)
    with GraphComm(W, T.ring(N)) as mc:                # the driver's control communicator
        owner = algo.leader_model(state, mc, buf)
    err = np.abs(buf - slot_g[2]).max()
    assert_all(owner == slot_g[1] and err < 1e-10, f"published leader {owner} (reference {slot_g[1]}), {err:.3e}")
    assert_all((gc.bytes_sent, gc.messages_sent) == traffic,
               f"evaluating the leader counted as training traffic: {traffic} -> {gc.bytes_sent, gc.messages_sent}")
    if how == "ties":
        assert_all(set(owners) == {0}, f"a tie took the slot: owners {owners}")
    else:
        assert_all(N == 1 or len(set(owners)) > 1, f"the leader never changed hands ({owners}): a weak check")
    algo.close()
    gc.close()


def test_async_leader_model_before_any_election_is_rank_0s():
    algo, state, gc, *_ = _serialised("lsgd", ["algorithm.tau_G=50"], 3)
    buf = np.empty_like(state.x)
    owner = algo.leader_model(state, gc, buf)
    x0 = W.bcast(state.x.copy(), root=0)
    assert_all(owner == 0 and np.array_equal(buf, x0) and state.have_g == 0, f"owner {owner}")
    algo.close()
    gc.close()


@pytest.mark.parametrize("extra", [["algorithm.tau=1"], ["algorithm.tau=2", "algorithm.momentum=0.6",
                                                         "algorithm.weight_decay=0.01", "algorithm.beta=0.9"]])
def test_serialised_async_easgd_matches_reference(extra):
    """Also a resumed center: rank 0's state.c (the host's snapshot) seeds the window."""
    steps = 9
    shift = 0.25

    def resumed(state):
        state.c += shift

    algo, state, gc, oracles, x0, lr = _serialised("easgd", ["algorithm.lr=0.1"] + extra, steps, before=resumed)
    c = algo.cfg
    X, cen = ref.easgd_async_serial(x0, oracles, steps, lr, beta=c.beta, tau=c.tau, mu=c.momentum,
                                    wd=c.weight_decay, c0=x0 + shift)
    err = np.abs(state.x - X[R]).max()
    assert_all(err < 1e-10, f"serialised async easgd {extra}: max |mpi - reference| = {err:.3e}")
    traffic = (gc.bytes_sent, gc.messages_sent)
    with GraphComm(W, T.ring(N)) as mc:                 # snapshots are not training traffic
        algo.prepare_checkpoint(state, mc)
        out = algo.center_model(state, mc, np.empty_like(state.x))
    cerr = np.abs(out - cen).max()
    snap = np.abs(state.c - cen).max() if R == 0 else 0.0      # the host's snapshot for checkpoints
    assert_all(cerr < 1e-10 and snap < 1e-10, f"center: {cerr:.3e}, host snapshot {snap:.3e}")
    # version 1 = x0 (restored as the shifted center), then one per worker per communication step
    version = state.c_hdr[0] if R == 0 else 1 + N * (steps // c.tau)
    assert_all(version == 1 + N * (steps // c.tau), f"center version {version} != {1 + N * (steps // c.tau)}")
    assert_all((gc.bytes_sent, gc.messages_sent) == traffic,
               f"snapshot and evaluation counted as traffic: {traffic} -> {gc.bytes_sent, gc.messages_sent}")
    algo.close()
    gc.close()
