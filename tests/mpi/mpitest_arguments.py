"""Non-default arguments of the public collectives, and averages over agents whose values differ.

Two classes of planted bug pass tests that only use defaults or identical agents (issue 33):

* an argument ignored: a ``root`` other than 0, an ``op``, a ``scope``, a ``period``, a
  ``momentum_form``, a ``Topology`` object or a sub-communicator ``comm`` replaced by the default.  Every test here
  passes a non-default value whose correct result differs from the default's, and checks the
  result against a value this file computes with mpi4py / NumPy (the sub-communicator tests
  run both halves of the world at once, each on its own communicator: a function that falls
  back to the world mixes the halves and fails at once instead of hanging);
* an average, sum or election over agents skipped: every agent (rank) holds different values
  (parameters, BatchNorm statistics, losses, sample counts), and the expected average is
  computed here from the gathered values.

Run at 3 ranks: sub-communicators {0, 2} and {1}, roots 1 and 2.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpidl
from mpiutil import assert_all
from optimutil import PlainSGD
from mpidl import config
from mpidl import optim
from mpidl import topology as T
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm, GridComm, LeaderComm
from mpidl.driver import train

MPI_SIZES = (3,)
MPI_TIMEOUT = 300
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
COLOR = R % 2                                    # halves of the world: {0, 2, ...} and {1, 3, ...}
MEMBERS = [r for r in range(N) if r % 2 == COLOR]  # world ranks of this rank's half, in sub-rank order

pytestmark = pytest.mark.skipif(N < 2, reason="non-default roots and sub-communicators need 2 ranks")


@pytest.fixture(scope="module")
def sub():
    c = W.Split(COLOR, key=R)
    yield c
    c.Free()


def _mine(values):
    """The entries of a world-gathered list that belong to this rank's half."""
    return [values[r] for r in MEMBERS]


# -- whole-model collectives ---------------------------------------------------------------

def _bn_model(rank):
    """Linear + BatchNorm with rank-dependent weights, running statistics and batch counter."""
    torch.manual_seed(rank)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    g = torch.Generator().manual_seed(50 + rank)
    for _ in range(rank + 1):                    # num_batches_tracked = rank + 1
        m(torch.randn(8, 3, generator=g) * (rank + 1) + rank)
    return m


def _state(m):
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def _differs(a, b):
    return any(not np.array_equal(a[k], b[k]) for k in a)


def test_broadcast_parameters_from_a_root_other_than_0():
    for root in range(1, N):
        m = _bn_model(R)
        want = W.bcast(_state(m), root=root)
        assert_all(_differs(want, W.bcast(_state(m), root=0)), "the roots' models must differ")
        mpidl.broadcast_parameters(m, root=root)
        got = _state(m)
        assert_all(not _differs(got, want), f"broadcast_parameters(root={root}) did not copy rank {root}'s "
                                            "parameters and buffers")


def test_average_and_broadcast_parameters_on_a_sub_communicator(sub):
    m = _bn_model(R)
    everyone = W.allgather(_state(m))
    mine = _mine(everyone)
    mpidl.average_parameters(m, comm=sub)
    got, bad, distinct = _state(m), [], []
    for k, v in got.items():
        if np.issubdtype(v.dtype, np.floating):
            want = np.mean(np.stack([s[k].astype(np.float64) for s in mine]), 0)
            world = np.mean(np.stack([s[k].astype(np.float64) for s in everyone]), 0)
            distinct += [k] if not np.allclose(want, world, atol=1e-3) else []
            bad += [k] if not np.allclose(v, want, rtol=1e-6, atol=1e-6) else []
        elif v != max(s[k] for s in mine):
            bad.append(k)
    assert_all("0.weight" in distinct and "1.running_mean" in distinct, f"halves too alike: {distinct}")
    assert_all(not bad, f"average_parameters(comm=sub): not this half's mean of {bad}")
    # root 0 of each half first: were the world used, the halves' roots would differ and hang
    for root in (0, sub.Get_size() - 1):
        m = _bn_model(R)
        mpidl.broadcast_parameters(m, root=root, comm=sub)
        assert_all(not _differs(_state(m), mine[root]),
                   f"broadcast_parameters(root={root}, comm=sub) did not copy the model of the half's rank {root}")


# -- the optimizer wrappers on a sub-communicator --------------------------------------------

def _data(rank):
    rng = np.random.default_rng(100 + rank)
    return rng.standard_normal((8, 3)), rng.standard_normal(8)


def _grad(theta, rank):
    """Gradient of mean((X w + b - y)^2) at theta = (w, b), by hand."""
    X, y = _data(rank)
    r = X @ theta[:3] + theta[3] - y
    return np.append(X.T @ r, r.sum()) * 2.0 / len(y)


def _start(rank):
    return np.random.default_rng(7 + rank).standard_normal(4)


def _linear(theta):
    m = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(theta[:3]).view(1, 3))
        m.bias.copy_(torch.from_numpy(theta[3:]))
    return m


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).numpy().copy()


def _step(opt, m, loss=None):
    X, y = (torch.from_numpy(a) for a in _data(R))
    opt.zero_grad()
    ls = F.mse_loss(m(X).squeeze(1), y)
    ls.backward()
    opt.step(loss=ls if loss is None else loss)


LR = 0.1


def _mean(vals, weights=None):
    return np.average(np.stack(vals), axis=0, weights=weights)


def _consensus_sgd(sub):
    """CDSGD (cta) on the complete graph of this half: x_i <- mean_j x_j - lr g_i(x_i)."""
    m = _linear(_start(R))
    with optim.Consensus(torch.optim.SGD(m.parameters(), lr=LR), topology="complete", comm=sub) as opt:
        _step(opt, m)
    x0 = _mine([_start(r) for r in range(N)])
    return [(_flat(m), _mean(x0) - LR * _grad(_start(R), R), "one CDSGD step")]


def _consensus_generic_period2(sub):
    """Own optimizer, comm_period=2: the first step is local only, the second mixes (complete graph)."""
    m = _linear(_start(R))
    out = []
    y = [_start(r) - LR * _grad(_start(r), r) for r in range(N)]
    z = [y[r] - LR * _grad(y[r], r) for r in range(N)]
    with optim.Consensus(PlainSGD(m.parameters(), lr=LR), topology="complete", comm_period=2, comm=sub) as opt:
        _step(opt, m)
        out.append((_flat(m), y[R], "step 1 (no mix yet)"))
        _step(opt, m)
        out.append((_flat(m), _mean(_mine(z)), "step 2 (mixed)"))
    return out


def _centralized(sub, cls):
    m = _linear(_start(R))
    with optim.Centralized(cls(m.parameters(), lr=LR), comm=sub) as opt:
        _step(opt, m)
    g = _mean(_mine([_grad(_start(r), r) for r in range(N)]))
    return [(_flat(m), _start(R) - LR * g, "x_i - lr mean_j g_j")]


def _n(rank):
    return 10 * (rank + 1) ** 2                  # sample counts: 10, 40, 90, ...


def _fedavg_sgd_period2(sub):
    """torch SGD (the algorithm's own step), period=2, weights n_j: local, local, weighted average."""
    m = _linear(_start(R))
    y = [_start(r) - LR * _grad(_start(r), r) for r in range(N)]
    z = [y[r] - LR * _grad(y[r], r) for r in range(N)]
    out = []
    with optim.FedAvg(torch.optim.SGD(m.parameters(), lr=LR), period=2, num_samples=_n(R), comm=sub) as opt:
        _step(opt, m)
        out.append((_flat(m), y[R], "step 1 (local)"))
        _step(opt, m)
        out.append((_flat(m), _mean(_mine(z), _mine([_n(r) for r in range(N)])), "step 2 (weighted average)"))
    return out


def _fedavg_generic(sub):
    m = _linear(_start(R))
    with optim.FedAvg(PlainSGD(m.parameters(), lr=LR), period=1, num_samples=_n(R), comm=sub) as opt:
        _step(opt, m)
    y = [_start(r) - LR * _grad(_start(r), r) for r in range(N)]
    return [(_flat(m), _mean(_mine(y), _mine([_n(r) for r in range(N)])), "weighted average")]


def _leader(sub):
    """tau_G=1, window=1: after the SGD step the worker with the lowest loss (here the highest
    world rank of the half) is elected; every worker pulls lam_G toward its model."""
    x0 = _start(0)
    m = _linear(x0)
    y = [x0 - LR * _grad(x0, r) for r in range(N)]
    lead = MEMBERS[-1]
    with optim.LeaderSGD(torch.optim.SGD(m.parameters(), lr=LR), tau_G=1, window=1, lam_G=0.3, comm=sub) as opt:
        _step(opt, m, loss=10.0 - R)
        got_rank = opt.leader_rank()
    return [(_flat(m), y[R] - 0.3 * (y[R] - y[lead]), "pull toward the leader"),
            (np.array([got_rank]), np.array([len(MEMBERS) - 1]), "leader_rank() (rank in comm)")]


def _easgd(sub):
    """tau=1, beta: step 1 moves nothing (every x equals the centre); step 2 the elastic pull,
    a = beta / n, the centre c = x0 + a sum_j (x1_j - x0) over this half."""
    x0, beta = _start(0), 0.6
    m = _linear(x0)
    a = beta / len(MEMBERS)
    x1 = [x0 - LR * _grad(x0, r) for r in range(N)]
    with optim.EASGD(torch.optim.SGD(m.parameters(), lr=LR), tau=1, beta=beta, comm=sub) as opt:
        _step(opt, m)
        _step(opt, m)
        c = opt.center().numpy().copy()
    want_c = x0 + a * np.sum(np.stack(_mine(x1)) - x0, axis=0)
    return [(c, want_c, "centre"), (_flat(m), x1[R] - LR * _grad(x1[R], R) - a * (x1[R] - x0), "worker")]


WRAPPERS = {
    "consensus-sgd": _consensus_sgd,
    "consensus-own-optimizer-period2": _consensus_generic_period2,
    "centralized-sgd": lambda sub: _centralized(sub, torch.optim.SGD),
    "centralized-own-optimizer": lambda sub: _centralized(sub, PlainSGD),
    "fedavg-sgd-period2": _fedavg_sgd_period2,
    "fedavg-own-optimizer": _fedavg_generic,
    "leader-sgd": _leader,
    "easgd": _easgd,
}


@pytest.mark.parametrize("case", list(WRAPPERS))
def test_optim_wrapper_on_a_sub_communicator(sub, case):
    """Each half trains with its own wrapper on its own communicator, every rank from different
    data (and, where the algorithm allows, a different start): the result is this half's value,
    computed here by hand."""
    bad = [f"{what}: {got} != {want}" for got, want, what in WRAPPERS[case](sub)
           if not np.allclose(got, want, rtol=1e-12, atol=1e-12)]
    assert_all(not bad, f"{case} (comm=sub): " + "; ".join(bad))


def test_consensus_momentum_form_other_than_the_sgds_own():
    """momentum_form="nesterov" with SGD(nesterov=False) runs Nesterov CDMSGD (the same as
    SGD(nesterov=True)); "heavy-ball" with SGD(nesterov=True) runs heavy-ball; the two differ."""
    def run(nesterov, form):
        m = _linear(_start(R))
        sgd = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, nesterov=nesterov)
        with optim.Consensus(sgd, momentum_form=form) as opt:
            for _ in range(3):
                _step(opt, m)
        return _flat(m)
    nest, heavy = run(True, None), run(False, None)
    assert_all(not np.allclose(nest, heavy, atol=1e-6), "the two forms must differ")
    assert_all(np.array_equal(run(False, "nesterov"), nest), "momentum_form='nesterov' ignored")
    assert_all(np.array_equal(run(True, "heavy-ball"), heavy), "momentum_form='heavy-ball' ignored")


def test_consensus_with_a_topology_object():
    """topology= a mpidl.Topology (the path graph, whose weights differ from the default ring's):
    one CDSGD step is x_i <- sum_j W_ij x_j - lr g_i(x_i) with the path's W."""
    topo = T.path(N)
    assert_all(not np.allclose(topo.weights, T.ring(N).weights), "path and ring must differ")
    m = _linear(_start(R))
    with optim.Consensus(torch.optim.SGD(m.parameters(), lr=LR), topology=topo) as opt:
        _step(opt, m)
    want = topo.weights[R] @ np.stack([_start(r) for r in range(N)]) - LR * _grad(_start(R), R)
    assert_all(np.allclose(_flat(m), want, rtol=1e-12, atol=1e-12), f"Consensus(topology=path): {_flat(m)} != {want}")


# -- mpidl.comm: roots, ops, scopes -------------------------------------------------------------

def test_graphcomm_bcast_root_and_start_allreduce_ops():
    x = np.random.default_rng(30 + R).standard_normal(5)
    stack = np.stack(W.allgather(x))
    with GraphComm(W, T.ring(N)) as gc:
        for root in range(1, N):
            a = x.copy()
            gc.bcast(a, root=root)
            t = torch.from_numpy(x.copy())
            gc.bcast(t, root=root)
            obj = gc.bcast({"rank": R}, root=root)
            assert_all(np.array_equal(a, stack[root]) and np.array_equal(t.numpy(), stack[root])
                       and obj == {"rank": root}, f"GraphComm.bcast(root={root})")
        for op, fn in (("sum", np.sum), ("max", np.max), ("min", np.min)):
            got = gc.start_allreduce(x, op=op).wait()
            assert_all(np.allclose(got, fn(stack, 0), rtol=1e-14, atol=1e-14), f"start_allreduce(op={op!r})")


def test_gridcomm_bcast_root_and_stage_allreduce_ops():
    x = np.random.default_rng(40 + R).standard_normal(4)
    stack = np.stack(W.allgather(x))
    with GridComm(W, N, 1) as g:                 # one stage: the stage's copies are every rank
        for op, fn in (("sum", np.sum), ("max", np.max), ("min", np.min), ("mean", np.mean)):
            got = g.allreduce_stage(x, op=op)
            assert_all(np.allclose(got, fn(stack, 0), rtol=1e-14, atol=1e-14), f"allreduce_stage(op={op!r})")
        assert_all(g.bcast({"rank": R}, root=N - 1) == {"rank": N - 1}, f"GridComm.bcast(root={N - 1})")


def test_leadercomm_scopes_and_roots():
    gs = 2 if N % 2 == 0 else 1
    loss = 10.0 - R                              # the lowest: the last rank (of the world, of a group)
    losses = W.allgather(loss)
    x = np.full(3, float(R))
    with GraphComm(W, T.ring(N)) as gc:
        lc = LeaderComm(gc, "size", gs)
        try:
            v, r = lc.elect(loss)
            assert_all((v, r) == (min(losses), int(np.argmin(losses))), f"elect (world) {v, r}")
            group = list(range(R // gs * gs, R // gs * gs + gs))
            gl = [losses[q] for q in group]
            v, r = lc.elect(loss, scope="group")
            assert_all((v, r) == (min(gl), int(np.argmin(gl))), f"elect(scope='group') {v, r}")
            a = x.copy()
            lc.bcast(a, N - 1)
            assert_all(np.all(a == N - 1), f"LeaderComm.bcast(root={N - 1})")
            a = x.copy()
            lc.bcast(a, gs - 1, scope="group")
            assert_all(np.all(a == group[-1]), f"LeaderComm.bcast(root={gs - 1}, scope='group')")
            out = np.empty(3)
            lc.allreduce_sum(x + np.arange(3.0) * R, out)
            assert_all(np.allclose(out, sum(r + np.arange(3.0) * r for r in range(N))), "allreduce_sum")
        finally:
            lc.close()


# -- the driver's average model and mpidl.fit on a sub-communicator --------------------------------

BN_FACTORY = """from torch import nn
import math
def make(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))
"""


def test_driver_average_model_has_the_agents_mean_batchnorm_statistics(shared_tmp):
    """By-class shards give every agent its own BatchNorm statistics.  The eval row's test loss
    and accuracy must be those of the mean parameters with the mean running statistics, computed
    here from the checkpointed agents, on the whole test set (the driver splits it over ranks)."""
    from mpidl.data import load_agent_data
    path = os.path.join(shared_tmp, "bn_factory.py")
    if R == 0:
        with open(path, "w") as f:
            f.write(BN_FACTORY)
    W.Barrier()
    steps = 30
    cfg = config.load(None, ["data.dataset=digits", "data.partition=by-class", f"model.factory={path}:make",
                             "algorithm.name=cdsgd", "algorithm.lr=0.2", "run.batch_size=16",
                             f"run.steps={steps}", f"run.log_every={steps}", f"run.eval_every={steps}",
                             f"run.checkpoint_every={steps}", "data.eval_samples=0", f'run.out="{shared_tmp}"',
                             "run.name=bn"])
    res = train(cfg, W)
    with GraphComm(W, T.complete(N)) as gc:
        state, _ = CheckpointStore(f"{shared_tmp}/bn/checkpoints", gc).load(steps)
    xs = W.allgather(np.asarray(state["algo"]["x"]))
    bufs = W.allgather({k: np.asarray(v) for k, v in state["buffers"].items()})
    spec = importlib.util.spec_from_file_location("bn_factory_here", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shard = load_agent_data("digits", rank=0, world_size=N)
    net = mod.make(shard.input_shape, shard.num_classes)
    X, Y = torch.from_numpy(np.asarray(shard.x_test, np.float32)), torch.from_numpy(np.asarray(shard.y_test))

    def scored(x, buffers, rows=slice(None)):
        with torch.no_grad():
            off = 0
            for p in net.parameters():
                p.copy_(torch.from_numpy(x[off:off + p.numel()]).view(p.shape).float())
                off += p.numel()
            own = dict(net.named_buffers())
            for k, v in buffers.items():
                own[k].copy_(torch.from_numpy(np.asarray(v)))
            net.eval()
            out = net(X[rows])
            return (float(F.cross_entropy(out, Y[rows].long(), reduction="sum")),
                    int((out.argmax(1) == Y[rows]).sum()), len(Y[rows]))

    xbar = np.mean(np.stack(xs).astype(np.float64), 0)
    mean_bufs = {k: np.mean(np.stack([b[k].astype(np.float64) for b in bufs]), 0).astype(np.float32)
                 for k in bufs[0] if np.issubdtype(bufs[0][k].dtype, np.floating)}
    spread = max(float(np.abs(b[k] - mean_bufs[k]).max()) for b in bufs for k in mean_bufs)
    loss, correct, n = scored(xbar, mean_bufs)
    # what each rank scoring its slice with its own statistics would give (the averaging skipped)
    skip = [scored(xbar, {k: bufs[r][k] for k in mean_bufs}, slice(r, None, N)) for r in range(N)]
    loss_skip = sum(s[0] for s in skip) / n
    want_loss, want_acc = loss / n, correct / n
    assert_all(spread > 1e-2 and abs(loss_skip - want_loss) > 1e-3,
               f"agents' statistics too alike to tell the mean from one agent's (spread {spread:.3g}, "
               f"losses {want_loss:.5f} / {loss_skip:.5f})")
    ok = abs(res["test_loss"] - want_loss) <= 1e-5 * max(1.0, want_loss) and abs(res["test_acc"] - want_acc) <= 1 / n
    assert_all(ok, f"average model: test_loss {res['test_loss']:.6f}, test_acc {res['test_acc']:.4f}; with the "
                   f"agents' mean statistics {want_loss:.6f}, {want_acc:.4f} (each agent's own: {loss_skip:.6f})")


def test_fit_and_average_model_on_a_sub_communicator(shared_tmp, sub):
    """Both halves call mpidl.fit (hence mpidl.train) on their own communicator, each rank with its
    own initial weights.  A tiny lr keeps the weights where they started: every agent of a half
    starts from that half's rank 0 (not world rank 0), the run has the half's agents, and
    average_model() averages over the half only."""
    import h5py

    from mpidl.data import load_dataset
    from mpidl.models import build_model
    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, ds.num_classes, (8,), seed=R)
    inits = W.allgather(_flat(model))
    res = mpidl.fit(model, (ds.x_train, ds.y_train), (ds.x_test, ds.y_test), algorithm="cdsgd", lr=1e-9, steps=4,
                    batch_size=16, log_every=2, eval_samples=50, out=shared_tmp, run_name=f"half{COLOR}", comm=sub)
    start = _mine(inits)[0]
    assert_all(np.abs(res.params - start).max() < 1e-6,
               f"fit(comm=sub) did not start from world rank {MEMBERS[0]}'s weights")
    with h5py.File(res.results_path, "r") as f:
        size = int(f.attrs["world_size"])
    assert_all(size == len(MEMBERS), f"the run had {size} agents, this half has {len(MEMBERS)}")
    params = W.allgather(res.params.astype(np.float64))
    want = _mean(_mine(params))
    assert_all(not np.allclose(want, _mean(params), atol=1e-3), "the halves' averages must differ")
    avg = _flat(res.average_model())
    assert_all(np.allclose(avg, want, rtol=1e-6, atol=1e-6), "average_model() is not this half's mean")
