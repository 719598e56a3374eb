"""Overlap with backward (mpidl.comm.overlap): gradient buckets and progress modes change no result.

* Buckets: the bucketed mean of the gradient equals one allreduce of it bitwise at 1 and 2 ranks
  (a sum of two numbers does not depend on the order); at 3 and 4 ranks the MPI may add the
  ranks' values in another order for another message size, so there the bound is a relative
  1e-6 (MPICH 5 gave the same bits here as well; the test prints nothing about that, it allows
  either).
* Progress: ``none``, ``hooks`` and ``thread`` give the same bits at every size (the combine and
  the update are the same code; only when bytes move changes).
* Resume: a run with buckets and progress on, stopped and resumed, equals the straight run bitwise.

The driver and ``mpidl.optim`` tests run at 2 ranks (the bitwise case) and 3 (the 1e-6 case)
only, to keep this file's four launches short; the unit tests run at every size.
"""
import time

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpiutil import assert_all
from mpidl import config, optim
from mpidl import topology as T
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.comm.overlap import bucket_ranges
from mpidl.driver import train
from mpidl.flat import FlatModel

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 400
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
STEPS = 12
BASE = ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16", "run.log_every=100",
        "run.eval_every=1000", "data.eval_samples=50", f"run.steps={STEPS}", "run.checkpoint_every=6"]
TINY = "comm.bucket_mb=0.001"   # 1048 bytes: the digits MLP (1210 floats) in 5 buckets


slow_sizes_only = pytest.mark.skipif(N not in (2, 3), reason="driver / optim cases run at 2 and 3 ranks")


def _same_or_close(a, b, what):
    """Bitwise at N <= 2; relative 1e-6 at N >= 3 (see the module docstring)."""
    a, b = np.asarray(a), np.asarray(b)
    if N <= 2:
        assert_all(np.array_equal(a, b), f"{what}: not bitwise equal, max |diff| = {np.abs(a - b).max():.3e}")
    else:
        rel = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        assert_all(rel <= 1e-6, f"{what}: relative difference {rel:.3e} > 1e-6")


def _mlp(seed=0, unused=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
              torch.nn.Linear(32, 3)]
    m = torch.nn.Sequential(*layers)
    if unused:                          # a parameter forward never uses: its hook never fires
        m = _WithSpare(m)
    return m


class _WithSpare(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.spare = torch.nn.Linear(4, 4)
        self.net = net

    def forward(self, x):
        return self.net(x)


def _grad_means(bucket_mb, progress="none", wd=0.01, none_grads=False, unused=False, steps=3):
    """Three SGD steps of a small MLP with the gradient averaged by gradient_mean; the final x."""
    m = _mlp(unused=unused)
    fm = FlatModel(m)
    rng = np.random.default_rng([7, R])
    with GraphComm(W, T.ring(N), progress=progress, bucket_mb=bucket_mb) as gc:
        gc.attach(fm)
        red = gc.gradient_mean(wd)
        for _ in range(steps):
            xb = torch.as_tensor(rng.standard_normal((20, 12)), dtype=torch.float32)
            loss = torch.tanh(m(xb)).pow(2).mean()
            if none_grads:              # a user loop's model.zero_grad(): autograd makes new tensors
                m.zero_grad(set_to_none=True)
                loss.backward()
                fm.collect_grads()
            else:
                fm.backward(loss)
            red.reduce(fm.g, fm.x)
            fm.x -= 0.1 * fm.g
        return fm.x.copy(), getattr(red, "buckets", 1), gc.bytes_sent


def test_bucket_ranges_cover_the_buffer_in_reverse_order():
    of_param, ranges = bucket_ranges([10, 5, 20, 3], bucket_bytes=4 * 8, itemsize=4)
    assert_all(ranges == [(15, 38), (0, 15)] and of_param == [1, 1, 0, 0], f"{ranges} {of_param}")
    of_param, ranges = bucket_ranges([10, 5, 20, 3], bucket_bytes=1, itemsize=4)
    assert_all(ranges == [(35, 38), (15, 35), (10, 15), (0, 10)] and of_param == [3, 2, 1, 0], f"{ranges}")


@pytest.mark.parametrize("case", ["plain", "none-grads", "unused-param"])
def test_bucketed_gradient_mean_equals_one_allreduce(case):
    kw = {"none_grads": case == "none-grads", "unused": case == "unused-param"}
    whole, nb, sent0 = _grad_means(0.0, **kw)
    assert_all(nb == 1, f"bucket_mb = 0 gave {nb} buckets")
    for mb, progress in ((0.001, "none"), (0.0001, "hooks"), (100.0, "thread")):
        x, nb, sent = _grad_means(mb, progress, **kw)
        assert_all(nb >= (2 if mb < 0.01 else 1), f"{mb} MiB: {nb} buckets")
        _same_or_close(x, whole, f"{case}: {nb} buckets ({mb} MiB, progress {progress}) vs one allreduce")
        if N == 1:
            assert_all(sent == 0, "one rank sends nothing")


def _driver(out, name, extra):
    cfg = config.load(None, BASE + [f'run.out="{out}"', f"run.name={name}"] + extra)
    res = train(cfg, W)
    return _params(out, name, res["step"]), res


def _params(out, name, step):
    with GraphComm(W, T.complete(N)) as gc:
        state, _ = CheckpointStore(f"{out}/{name}/checkpoints", gc).load(step)
    return {k: np.asarray(v) for k, v in state["algo"].items()}


CENTRAL = ["algorithm.name=centralized", "algorithm.lr=0.1", "algorithm.momentum=0.5",
           "algorithm.weight_decay=0.001"]


@slow_sizes_only
def test_driver_centralized_buckets_and_resume(shared_tmp):
    """[comm] bucket_mb and progress in the driver: equal to one allreduce; a resumed run equals the
    straight one bitwise (the buckets carry no state)."""
    whole, _ = _driver(shared_tmp, "whole", CENTRAL + ["comm.bucket_mb=0"])
    bucketed, res = _driver(shared_tmp, "bucketed", CENTRAL + [TINY, "comm.progress=hooks"])
    for k in whole:
        _same_or_close(bucketed[k], whole[k], f"centralized {k}: buckets vs one allreduce")
    assert_all(res["step"] == STEPS, f"{res}")
    extra = CENTRAL + [TINY, "comm.progress=thread"]
    cfg = config.load(None, BASE + [f'run.out="{shared_tmp}"', "run.name=resumed"] + extra)
    first = train(cfg, W, max_steps=6)
    assert_all(first["step"] == 6, f"first leg {first}")
    second = train(cfg.replace(run={"resume": "auto"}), W)
    assert_all(second["step"] == STEPS, f"second leg {second}")
    resumed = _params(shared_tmp, "resumed", STEPS)
    same = all(np.array_equal(resumed[k], bucketed[k]) for k in bucketed)
    assert_all(same, "centralized with buckets: 6 + resume 6 differs from 12 straight")


CDMSGD = ["algorithm.name=cdmsgd", "algorithm.lr=0.05", "algorithm.momentum=0.9", "topology.name=exponential"]


@slow_sizes_only
def test_driver_progress_modes_are_bitwise_and_resume(shared_tmp):
    """CDMSGD (the mix started before the gradient): progress none = hooks = thread.  (CDSGD's cta
    step starts and waits for its mix the same way, through the same GraphComm calls.)"""
    none, _ = _driver(shared_tmp, "none", CDMSGD + ["comm.progress=none"])
    for mode in ("hooks", "thread"):
        got, _ = _driver(shared_tmp, mode, CDMSGD + [f"comm.progress={mode}"])
        same = all(np.array_equal(got[k], none[k]) for k in none)
        assert_all(same, f"cdmsgd: progress {mode} differs from none")
    cfg = config.load(None, BASE + [f'run.out="{shared_tmp}"', "run.name=resumed"] + CDMSGD
                      + ["comm.progress=hooks"])
    train(cfg, W, max_steps=6)
    second = train(cfg.replace(run={"resume": "auto"}), W)
    assert_all(second["step"] == STEPS, f"second leg {second}")
    resumed = _params(shared_tmp, "resumed", STEPS)
    assert_all(all(np.array_equal(resumed[k], none[k]) for k in none), "cdmsgd hooks: resume differs")


@pytest.mark.parametrize("mode", ["hooks", "thread"])
def test_progress_tests_the_pending_mix_during_backward(mode):
    """The hooks (or the thread) call MPI_Test on the mix started before backward; the mixed
    result is the blocking mix's."""
    m = _mlp(seed=R)
    fm = FlatModel(m)
    with GraphComm(W, T.ring(N), progress=mode) as gc:
        gc.attach(fm)
        ref = gc.mix(fm.x.copy())
        buf = np.empty_like(fm.x)
        pending = gc.start_mix(fm.x, out=buf)
        deadline = time.monotonic() + 20     # a loaded machine may start the thread late
        while True:
            fm.backward(torch.tanh(m(torch.ones(256, 12))).pow(2).sum())
            if gc.overlap.tests or time.monotonic() > deadline:
                break
        got = pending.wait()
        tests = gc.overlap.tests
    assert_all(np.array_equal(got, ref), f"progress {mode}: the mix differs from the blocking mix")
    assert_all(tests > 0, f"progress {mode}: no MPI_Test was made during backward")


@slow_sizes_only
def test_optim_centralized_buckets_equal_one_allreduce():
    """mpidl.optim.Centralized: the user's backward fills the buckets (SGD and another optimizer)."""
    out = {}
    for mb in (0, 0.001):
        for kind in ("sgd", "adam"):
            m = _mlp()
            base = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, weight_decay=0.01) if kind == "sgd"
                    else torch.optim.Adam(m.parameters(), lr=0.01))
            opt = optim.Centralized(base, bucket_mb=mb, progress="hooks" if mb else "none")
            rng = np.random.default_rng([3, R])
            for _ in range(4):
                xb = torch.as_tensor(rng.standard_normal((20, 12)), dtype=torch.float32)
                opt.zero_grad()
                loss = torch.tanh(m(xb)).pow(2).mean()
                loss.backward()
                opt.step()
            out[mb, kind] = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).numpy().copy()
            opt.close()
    for kind in ("sgd", "adam"):
        _same_or_close(out[0.001, kind], out[0, kind], f"optim.Centralized {kind}: buckets vs one allreduce")


@slow_sizes_only
def test_two_backwards_per_step_is_an_error_with_buckets():
    m = _mlp()
    opt = optim.Centralized(torch.optim.SGD(m.parameters(), lr=0.1), bucket_mb=0.001)
    xb = torch.ones(4, 12)
    opt.zero_grad()
    m(xb).sum().backward()
    m(xb).sum().backward()
    err = None
    try:
        opt.step()
    except RuntimeError as e:
        err = e
    opt.close()
    assert_all(err is not None and "two backward passes" in str(err), f"got {err!r}")


@slow_sizes_only
def test_fdg_pipeline_messages_progress_modes_are_bitwise(shared_tmp):
    """The decoupled pipeline's messages (pending while a stage computes) under every progress mode."""
    # cuts pinned: balanced cuts come from timings, which a loaded machine changes between two runs
    fdg = ["algorithm.name=fdg", f"algorithm.stages={N}", f"algorithm.cuts={list(range(1, N))}",
           "algorithm.momentum=0.9", "algorithm.lr=0.1", "model.hidden=[12, 10, 8]", 'model.dtype="float32"']
    ref, _ = _driver(shared_tmp, "fdg-none", fdg)
    for mode in ("hooks",) if N == 2 else ("thread",):      # one mode per size: both are covered
        got, _ = _driver(shared_tmp, f"fdg-{mode}", fdg + [f"comm.progress={mode}"])
        same = all(np.array_equal(got[k], ref[k]) for k in ref)
        assert_all(same, f"fdg K={N}: progress {mode} differs from none")
