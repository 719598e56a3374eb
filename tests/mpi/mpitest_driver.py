"""The training driver under mpiexec: exact resume, agreed errors, divergence handling."""
import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import config
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.driver import DivergenceError, train
from mpidl.errors import MpidlError
from mpidl import topology as T

MPI_SIZES = (1, 2, 3)
MPI_TIMEOUT = 400
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()


@pytest.fixture
def out(shared_tmp):
    return shared_tmp


def _cfg(out, *extra):
    return config.load(None, ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16",
                              f'run.out="{out}"', "run.log_every=5", "run.eval_every=10",
                              "data.eval_samples=100"] + list(extra))


def _final_params(out, name, step):
    with GraphComm(WORLD, T.complete(N)) as gc:
        state, meta = CheckpointStore(f"{out}/{name}/checkpoints", gc).load(step)
    return state["algo"]


@pytest.mark.parametrize("algo", ["cdmsgd", "next"])
def test_resume_is_bitwise(out, algo):
    extra = [f"algorithm.name={algo}", "run.steps=20", "run.checkpoint_every=10"]
    if algo == "next":
        extra += ["algorithm.tau=10.0"]
    straight = train(_cfg(out, *extra, "run.name=straight"), WORLD)
    first = train(_cfg(out, *extra, "run.name=resumed"), WORLD, max_steps=10)
    assert_all(first["step"] == 10 and first["stop"] == "max_steps", f"first leg {first}")
    second = train(_cfg(out, *extra, "run.name=resumed", "run.resume=auto"), WORLD)
    assert_all(second["step"] == 20, f"second leg {second}")
    a, b = _final_params(out, "straight", 20), _final_params(out, "resumed", 20)
    same = all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    assert_all(same, f"{algo}: 10 + resume 10 differs from 20 straight")
    assert_all(straight["test_acc"] == second["test_acc"], "final metrics differ")
    if R == 0:
        with h5py.File(f"{out}/resumed/results.h5") as f:
            steps = f["eval/step"][()]
        assert list(steps) == [10, 20], steps


def test_config_typo_is_one_error_everywhere(out):
    assert_raises_all(MpidlError, config.load_collective, WORLD, None, ["algorithm.lrate=0.1"], match="lrate")


def test_topology_that_does_not_fit(out):
    if N & (N - 1) == 0:
        pytest.skip("hypercube fits power-of-two sizes")
    assert_raises_all(MpidlError, train, _cfg(out, "topology.name=hypercube", "run.steps=2"), WORLD,
                      match="power-of-two")


def test_divergence_names_step_and_agent_and_keeps_checkpoint(out):
    cfg = _cfg(out, "algorithm.name=cdsgd", "algorithm.lr=1e30", "run.steps=40", "run.checkpoint_every=1",
               "run.log_every=1", "run.name=nan")
    err = assert_raises_all(DivergenceError, train, cfg, WORLD, match="NaN/inf at step")
    assert_all("on rank" in str(err) and "Last good checkpoint" in str(err), str(err))
    with GraphComm(WORLD, T.complete(N)) as gc:
        store = CheckpointStore(f"{out}/nan/checkpoints", gc)
        step = store.latest()
        if step is not None:
            state, _ = store.load(step)
            ok = all(np.all(np.isfinite(v)) for v in state["algo"].values() if isinstance(v, np.ndarray))
        else:
            ok = True
    assert_all(ok, "the newest checkpoint holds non-finite values")


# -- resume where it is hard: RNG consumed by dropout, BatchNorm buffers -------------------
def _series(out, name):
    from mpidl.metrics import load_results
    return load_results(f"{out}/{name}/results.h5")["series"]


def _checkpoint(out, name, step):
    with GraphComm(WORLD, T.complete(N)) as gc:
        state, _ = CheckpointStore(f"{out}/{name}/checkpoints", gc).load(step)
    return state


def _same_tree(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same_tree(a[k], b[k]) for k in a)
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("model", ["mlp-dropout", "resnet20"])
def test_resume_with_rng_and_buffers_matches_straight_run(out, model):
    """10 + resume 10 == 20 with a model that draws random numbers (dropout) or keeps BatchNorm
    running statistics: the final state, the BatchNorm buffers, and every row of the train and
    eval series must equal the uninterrupted run's.  A fresh process is simulated by reseeding
    torch and NumPy before the second leg, so a resume that skips set_rng_state or
    load_extra_state differs."""
    import torch
    extra = ["algorithm.name=cdsgd", "algorithm.lr=0.05", "run.steps=20", "run.checkpoint_every=10",
             "model.dtype=float64", "run.log_every=5", "run.eval_every=5", "data.eval_samples=60"]
    extra += (["model.hidden=[16]", "model.dropout=0.3"] if model == "mlp-dropout"
              else ["model.name=resnet20", "run.batch_size=8"])
    train(_cfg(out, *extra, "run.name=straight"), WORLD)
    first = train(_cfg(out, *extra, "run.name=resumed"), WORLD, max_steps=10)
    assert_all(first["step"] == 10, f"first leg {first}")
    torch.manual_seed(1234 + R)                 # what a new process would have
    np.random.seed(4321 + R)
    second = train(_cfg(out, *extra, "run.name=resumed", "run.resume=auto"), WORLD)
    assert_all(second["step"] == 20, f"second leg {second}")
    a, b = _checkpoint(out, "straight", 20), _checkpoint(out, "resumed", 20)
    assert_all(_same_tree(a["algo"], b["algo"]), f"{model}: parameters after 10 + 10 differ from 20")
    assert_all(_same_tree(a["buffers"], b["buffers"]), f"{model}: model buffers differ")
    if model == "resnet20":
        assert_all(any("running_mean" in k for k in a["buffers"]), f"no BatchNorm buffers: {list(a['buffers'])}")
    bad = _series_differences(out, "straight", "resumed", skip={"wall", "wall_time", "bytes_sent"}) if R == 0 else []
    bad = WORLD.bcast(bad)
    assert_all(not bad, f"{model}: " + "; ".join(bad))


def _series_differences(out, a, b, skip):
    """Rank 0: every column (but ``skip``) of the train and eval series of runs a and b, row by row."""
    s, t = _series(out, a), _series(out, b)
    bad = []
    for name in ("train", "eval"):
        if list(s[name]["step"]) != list(range(5, 21, 5)):
            bad.append(f"{name} steps {list(s[name]['step'])}")
        cols = sorted(set(s[name]) - skip)
        if sorted(set(t[name]) - skip) != cols:
            bad.append(f"{name} columns {sorted(t[name])} != {sorted(s[name])}")
            continue
        bad += [f"{name}/{c}: {list(s[name][c])} != {list(t[name][c])}" for c in cols
                if not np.array_equal(s[name][c], t[name][c])]
    return bad


def test_bytes_sent_series_continues_across_resume(out):
    if N == 1:
        pytest.skip("one rank sends nothing: the counter is 0 either way")
    extra = ["algorithm.name=cdsgd", "run.steps=20", "run.checkpoint_every=10", "run.log_every=5",
             "run.eval_every=5"]
    train(_cfg(out, *extra, "run.name=straight"), WORLD)
    train(_cfg(out, *extra, "run.name=resumed"), WORLD, max_steps=10)
    train(_cfg(out, *extra, "run.name=resumed", "run.resume=auto"), WORLD)
    bad = _series_differences(out, "straight", "resumed", skip={"wall", "wall_time"}) if R == 0 else []
    bad = WORLD.bcast(bad)
    assert_all(not bad, "; ".join(bad))


# -- the driver's convex path against the stacked NEXT reference ------------------------------
@pytest.mark.parametrize("kind", ["logistic", "lsq"])
def test_convex_models_match_stacked_next_and_metrics(out, kind):
    """model.name=convex-<kind>, full batch NEXT through the driver: the checkpointed states equal
    the stacked reference run with the independent NumPy oracle on the same shards, and the
    results rows (train loss, bytes sent, consensus, test loss/accuracy, objective, per-agent
    accuracy) equal the same numbers recomputed from the reference states."""
    from mpidl.data import load_agent_data
    from reference.convex import ConvexRef
    from reference.next import next_stacked
    steps, tau, lam = 12, 2.0, 0.01
    cfg = _cfg(out, f"data.dataset=synthetic-{kind}", f"model.name=convex-{kind}", "algorithm.name=next",
               "run.batch_size=0", f"run.steps={steps}", f"algorithm.tau={tau}", "algorithm.alpha0=0.9",
               "algorithm.eps=0.02", "algorithm.reg=l2", f"algorithm.lam={lam}", "topology.name=path",
               "run.log_every=4", "run.eval_every=6", "run.checkpoint_every=6", f"run.name=convex-{kind}")
    train(cfg, WORLD)
    shards = [load_agent_data(f"synthetic-{kind}", rank=i, world_size=N) for i in range(N)]
    refs = [ConvexRef(s.x, s.y, kind) for s in shards]
    Wm = T.path(N).weights
    d = refs[0].dim
    trace = {}
    X, Y = next_stacked(Wm, np.zeros(d), refs, steps, tau, 0.9, 0.02, "l2", lam,
                        trace=lambda k, X, Y, G: trace.update({k + 1: X.copy()}))
    state = _checkpoint(out, f"convex-{kind}", steps)["algo"]
    wy = np.asarray(state["wy"])
    err = max(np.abs(wy[:d] - X[R]).max(), np.abs(wy[d:] - Y[R]).max())
    assert_all(err < 1e-10, f"convex-{kind}: driver state differs from the stacked reference by {err:.3e}")
    # the numbers in results.h5, recomputed from the reference
    xte, yte = shards[0].x_test, shards[0].y_test
    expect_train, expect_eval = {}, {}
    n_edges = np.count_nonzero(Wm - np.diag(np.diag(Wm)))      # messages per mix, all ranks together
    for k in (4, 8, 12):
        # NEXT reports the loss of step k's batch at the new iterate; the row averages the window
        losses = [refs[i].loss_grad(trace[j][i], j)[0] for j in range(k - 3, k + 1) for i in range(N)]
        expect_train[k] = {"train_loss": np.mean(losses), "bytes_sent": k * n_edges * 2 * d * 8}
        if kind == "logistic":      # the agents' training accuracies differ: their mean, not one agent's
            accs = [refs[i].evaluate(trace[j][i], refs[i].X, refs[i].y)[1] for j in range(k - 3, k + 1)
                    for i in range(N)]
            expect_train[k]["train_acc"] = np.mean(accs)
            assert_all(N == 1 or np.ptp(accs[-N:]) > 0, f"the agents' training accuracies are equal: {accs[-N:]}")
    for k in (6, 12):
        Xk = trace[k]
        wbar = Xk.mean(0)
        tl, ta = refs[0].evaluate(wbar, xte, yte)
        acc_i = [refs[0].evaluate(Xk[i], xte[:100], yte[:100])[1] for i in range(N)]
        row = {"test_loss": tl, "consensus_error": np.sqrt(np.mean(np.sum((Xk - wbar) ** 2, 1))),
               "objective": sum(r.full_loss_grad(wbar)[0] for r in refs) + lam * wbar @ wbar}
        if kind == "logistic":
            row.update(test_acc=ta, agent_acc_mean=np.mean(acc_i), agent_acc_min=min(acc_i),
                       agent_acc_max=max(acc_i))
        expect_eval[k] = row
    bad = []
    if R == 0:
        s = _series(out, f"convex-{kind}")
        for name, expect in (("train", expect_train), ("eval", expect_eval)):
            steps_got = list(s[name]["step"])
            for k, row in expect.items():
                if k not in steps_got:
                    bad.append(f"{name} has no row {k}")
                    continue
                j = steps_got.index(k)
                bad += [f"{name}[{k}].{c} = {s[name][c][j]!r} != {v!r}" for c, v in row.items()
                        if not abs(s[name][c][j] - v) <= 1e-9 * max(1.0, abs(v))]
    bad = WORLD.bcast(bad)
    assert_all(not bad, "; ".join(bad))
