"""mpidl.optim under mpiexec: a hand-written loop with each wrapper equals the driver's run.

The loop feeds the driver's batches (mpidl.oracles.batch_indices) to the driver's seeded model;
with torch.optim.SGD the wrapper runs the algorithm's own step, so the final parameters must be
bitwise equal to the driver's checkpointed ones, and the bytes sent equal the driver's count.  A
non-SGD optimizer (a plain-SGD Optimizer subclass, whose torch update may fuse multiply-add) takes
the generic path: within 1e-6 of the driver's run of the matching form.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpidl
import mpidl.flat
from mpiutil import assert_all, assert_raises_all, pmean
from optimutil import PlainSGD
from mpidl import config
from mpidl import optim
from mpidl import topology as T
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.data import load_agent_data
from mpidl.driver import train
from mpidl.models import build_model
from mpidl.oracles import batch_indices

MPI_SIZES = (1, 2, 3, 4)
MPI_TIMEOUT = 500
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
STEPS = 12
BASE = ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16", "run.log_every=100",
        "run.eval_every=1000", "data.eval_samples=50", f"run.steps={STEPS}", "run.checkpoint_every=1000"]


def _driver(out, name, algo):
    cfg = config.load(None, BASE + [f'run.out="{out}"', f"run.name={name}"] + algo)
    res = train(cfg, W)
    with GraphComm(W, T.complete(N)) as gc:
        state, _ = CheckpointStore(f"{out}/{name}/checkpoints", gc).load(STEPS)
    return cfg, res, np.asarray(state["algo"]["x"])


def _own_loop(cfg, make_opt, steps=STEPS):
    """The user's loop: the driver's data, model and batches, a wrapped optimizer."""
    d, r = cfg.data, cfg.run
    shard = load_agent_data(d.dataset, None, d.partition, d.alpha, d.seed, rank=R, world_size=N)
    spe = W.allreduce(len(shard.y), op=MPI.MIN) // r.batch_size
    model = build_model(cfg.model.name, shard.input_shape, shard.num_classes, cfg.model.hidden, seed=r.seed)
    X, Y = torch.as_tensor(shard.x).float(), torch.as_tensor(shard.y).long()
    opt = make_opt(model, len(shard.y))
    for k in range(steps):
        idx = torch.from_numpy(batch_indices(len(shard.y), r.batch_size, spe, r.seed, R, k))
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        opt.step(loss=loss)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()
    sent = W.allreduce(opt.bytes_sent())
    opt.close()
    return flat, sent, model


CASES = {
    "cdsgd-cta": (["algorithm.name=cdsgd", "algorithm.lr=0.1", "algorithm.weight_decay=0.01"],
                  lambda m, n: optim.Consensus(torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01))),
    "cdsgd-atc-period3": (["algorithm.name=cdsgd", "algorithm.lr=0.1", "algorithm.form=atc",
                           "algorithm.comm_period=3"],
                          lambda m, n: optim.Consensus(torch.optim.SGD(m.parameters(), lr=0.1), form="atc",
                                                       comm_period=3)),
    "cdmsgd-nesterov": (["algorithm.name=cdmsgd", "algorithm.lr=0.05", "algorithm.momentum=0.9",
                         "topology.name=exponential"],
                        lambda m, n: optim.Consensus(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                                                     nesterov=True), topology="exponential")),
    "cdmsgd-heavy-ball": (["algorithm.name=cdmsgd", "algorithm.lr=0.05", "algorithm.momentum=0.9",
                           "algorithm.momentum_form=heavy-ball"],
                          lambda m, n: optim.Consensus(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))),
    "centralized": (["algorithm.name=centralized", "algorithm.lr=0.1", "algorithm.momentum=0.5",
                     "algorithm.nesterov=true", "algorithm.weight_decay=0.001"],
                    lambda m, n: optim.Centralized(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5,
                                                                   nesterov=True, weight_decay=0.001))),
    "fedavg": (["algorithm.name=fedavg", "algorithm.lr=0.1", "algorithm.local_steps=4"],
               lambda m, n: optim.FedAvg(torch.optim.SGD(m.parameters(), lr=0.1), period=4, num_samples=n)),
    "lsgd": (["algorithm.name=lsgd", "algorithm.lr=0.1", "algorithm.momentum=0.5", "algorithm.tau_G=4",
              "algorithm.window=3", "algorithm.lam_G=0.2"],
             lambda m, n: optim.LeaderSGD(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5), tau_G=4,
                                          window=3, lam_G=0.2)),
    "easgd": (["algorithm.name=easgd", "algorithm.lr=0.1", "algorithm.momentum=0.5", "algorithm.tau=3",
               "algorithm.beta=0.5"],
              lambda m, n: optim.EASGD(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5), tau=3, beta=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sgd_wrapper_is_bitwise_the_driver(shared_tmp, case):
    algo, make = CASES[case]
    cfg, res, x_driver = _driver(shared_tmp, case, algo)
    x_own, sent, _ = _own_loop(cfg, make)
    assert_all(x_own.shape == x_driver.shape, f"{case}: {x_own.shape} vs {x_driver.shape}")
    diff = float(np.abs(x_own - x_driver).max())
    assert_all(np.array_equal(x_own, x_driver), f"{case}: own loop != driver, max diff {diff:.3e}")
    assert_all(sent == res["bytes_sent"], f"{case}: bytes {sent} != driver's {res['bytes_sent']}")
    if N > 1 and case not in ("centralized", "fedavg", "cdsgd-atc-period3"):  # these end on a full average
        spread = W.allreduce(float(np.abs(x_own - W.bcast(x_own, root=0)).max()), op=MPI.MAX)
        assert_all(spread > 0, f"{case}: agents identical, so the comparison proves less")


class _Resident(mpidl.flat.FlatModel):
    def __init__(self, model, dtype=torch.float32, device=None, resident=None):
        super().__init__(model, dtype, device, resident=True)


@pytest.mark.parametrize("mode", ["staged", "direct"])
@pytest.mark.parametrize("case", ["cdmsgd-nesterov", "centralized", "fedavg", "lsgd", "easgd"])
def test_sgd_wrapper_on_resident_buffers_is_bitwise_the_driver(shared_tmp, monkeypatch, case, mode):
    """The wrapper's flat buffer and the algorithm's state as tensors (what a model on a GPU gets),
    the communication staged through host buffers or handed to MPI as tensors (cuda_aware)."""
    import mpidl.comm.core as core
    algo, make = CASES[case]
    if case == "centralized":
        # a device model keeps one allreduce (no buckets): compare with the driver's one allreduce;
        # bucketed sums may round differently (seen under Open MPI at 3 ranks: 1.5e-8)
        algo = algo + ["comm.bucket_mb=0"]
    cfg, res, x_driver = _driver(shared_tmp, f"r-{case}-{mode}", algo)
    monkeypatch.setattr(mpidl.flat, "FlatModel", _Resident)
    if mode == "staged":
        monkeypatch.setattr(core, "STAGE_CPU_TENSORS", True)
    else:
        monkeypatch.setattr(optim, "_cuda_aware", lambda base, setting, device: True)
    x_own, sent, _ = _own_loop(cfg, make)
    diff = float(np.abs(x_own - x_driver).max())
    assert_all(np.array_equal(x_own, x_driver), f"{case} {mode}: own loop != driver, max diff {diff:.3e}")
    assert_all(sent == res["bytes_sent"], f"{case} {mode}: bytes {sent} != driver's {res['bytes_sent']}")


GENERIC = {
    "consensus-atc": (["algorithm.name=cdsgd", "algorithm.lr=0.1", "algorithm.form=atc"],
                      lambda m, n: optim.Consensus(PlainSGD(m.parameters(), lr=0.1))),
    "centralized": (["algorithm.name=centralized", "algorithm.lr=0.1"],
                    lambda m, n: optim.Centralized(PlainSGD(m.parameters(), lr=0.1))),
    "fedavg": (["algorithm.name=fedavg", "algorithm.lr=0.1", "algorithm.local_steps=5"],
               lambda m, n: optim.FedAvg(PlainSGD(m.parameters(), lr=0.1), period=5, num_samples=n)),
    "lsgd": (["algorithm.name=lsgd", "algorithm.lr=0.1", "algorithm.tau_G=3", "algorithm.window=2"],
             lambda m, n: optim.LeaderSGD(PlainSGD(m.parameters(), lr=0.1), tau_G=3, window=2)),
    "easgd": (["algorithm.name=easgd", "algorithm.lr=0.1", "algorithm.tau=2"],
              lambda m, n: optim.EASGD(PlainSGD(m.parameters(), lr=0.1), tau=2)),
}


@pytest.mark.parametrize("case", list(GENERIC))
def test_own_optimizer_path_matches_the_driver(shared_tmp, case):
    algo, make = GENERIC[case]
    cfg, res, x_driver = _driver(shared_tmp, "g-" + case, algo)
    x_own, sent, _ = _own_loop(cfg, make)
    diff = float(np.abs(x_own - x_driver).max())
    assert_all(diff < 1e-6, f"{case}: own optimizer path differs from the driver by {diff:.3e}")
    assert_all(sent == res["bytes_sent"], f"{case}: bytes {sent} != driver's {res['bytes_sent']}")


def test_lr_changes_are_followed(shared_tmp):
    """The SGD's lr is re-read every step (torch schedulers, manual changes): setting it to the
    driver's diminishing schedule reproduces the driver's run bit for bit."""
    from mpidl.algorithms.base import lr_at
    cfg, _, x_driver = _driver(shared_tmp, "sched", ["algorithm.name=cdmsgd", "algorithm.lr=0.2",
                                                     "algorithm.lr_schedule=diminishing", "algorithm.decay=0.3",
                                                     "algorithm.momentum=0.5"])
    spe = W.allreduce(len(load_agent_data("digits", rank=R, world_size=N).y), op=MPI.MIN) // 16

    class Scheduled:
        def __init__(self, m, n):
            self.opt = optim.Consensus(torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5, nesterov=True))
            self.k = 0

        def __getattr__(self, name):
            return getattr(self.opt, name)

        def step(self, loss=None):
            self.opt.param_groups[0]["lr"] = lr_at(cfg.algorithm, self.k, spe)
            self.opt.step(loss=loss)
            self.k += 1

    x_own, _, _ = _own_loop(cfg, Scheduled)
    assert_all(np.array_equal(x_own, x_driver), "lr set per step != the driver's diminishing schedule")


def test_different_models_raise_on_every_rank():
    if N == 1:
        pytest.skip("needs two ranks")
    model = torch.nn.Linear(4 + (R == N - 1), 3)
    assert_raises_all(ValueError, optim.Consensus, torch.optim.SGD(model.parameters(), lr=0.1),
                      match="different shapes")
    assert_raises_all(ValueError, mpidl.average_parameters, model, match="different shapes")
    assert_raises_all(ValueError, mpidl.broadcast_parameters, model, match="different shapes")


def test_bad_input_on_one_rank_raises_on_every_rank():
    model = torch.nn.Linear(4, 3)
    arg = "not an optimizer" if R == N - 1 else torch.optim.SGD(model.parameters(), lr=0.1)
    assert_raises_all(TypeError, optim.Consensus, arg, match="torch.optim.Optimizer")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if R == 0 else 0.0)
    # CDSGD on some ranks, CDMSGD with a period on others: the bad ones report, all raise
    assert_raises_all(ValueError, optim.Consensus, sgd, comm_period=2 if R == 0 else 1, match="comm_period")
    assert_raises_all(TypeError, optim.LeaderSGD, torch.optim.SGD(model.parameters(), lr=0.1), tau_g=3,
                      match="tau_G")
    assert_raises_all(ValueError, optim.FedAvg, torch.optim.SGD(model.parameters(), lr=0.1), period=0,
                      match="period")
    assert_raises_all(TypeError, mpidl.average_parameters, "model" if R == 0 else model, match="nn.Module")


def test_leader_sgd_needs_the_loss():
    model = torch.nn.Linear(4, 3)
    with optim.LeaderSGD(torch.optim.SGD(model.parameters(), lr=0.1)) as opt:
        model(torch.ones(2, 4)).sum().backward()
        assert_raises_all(ValueError, opt.step, match="loss")


def test_adam_consensus_reaches_agreement_and_learns():
    """Any optimizer: the local step then one mix; on a complete graph every agent ends equal."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    mpidl.broadcast_parameters(model)
    g = torch.Generator().manual_seed(100 + R)
    X = torch.randn(64, 3, generator=g)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]])
    with optim.Consensus(torch.optim.Adam(model.parameters(), lr=0.05), topology="complete") as opt:
        first = None
        for _ in range(150):
            opt.zero_grad(set_to_none=True)          # autograd makes new .grad tensors: collected
            loss = F.mse_loss(model(X), y)
            loss.backward()
            opt.step()
            first = float(loss.detach()) if first is None else first
        assert_all(opt.bytes_sent() == (150 * 16 * (N - 1) if N > 1 else 0),
                   f"bytes {opt.bytes_sent()}")   # 4 floats of 4 bytes to N-1 neighbours per step
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    spread = W.allreduce(float(np.abs(w - W.bcast(w, root=0)).max()), op=MPI.MAX)
    assert_all(spread < 1e-6, f"complete-graph consensus spread {spread}")
    assert_all(float(loss.detach()) < 0.05 * first, f"loss {first} -> {float(loss.detach())}")


def test_broadcast_and_average_parameters_with_batchnorm():
    torch.manual_seed(R)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(8, 3) + R)                       # rank-dependent running statistics
    before = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    allv = W.allgather(before)
    mpidl.average_parameters(model)
    after = model.state_dict()
    for k, v in after.items():
        stack = np.stack([a[k] for a in allv])
        if v.is_floating_point():
            ok = np.allclose(v.numpy(), stack.mean(0), atol=1e-6)
        else:
            ok = int(v) == stack.max()
        assert_all(ok, f"average of {k}")
    torch.manual_seed(10 + R)                          # rank-dependent again (after the average all are equal)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(8, 3) + R)
    root = W.bcast({k: v.numpy().copy() for k, v in model.state_dict().items()}, root=N - 1)
    mpidl.broadcast_parameters(model, root=N - 1)
    same = all(np.array_equal(v.numpy(), root[k]) for k, v in model.state_dict().items())
    assert_all(same, "broadcast_parameters did not copy the root's parameters and buffers")
    assert_raises_all(ValueError, mpidl.broadcast_parameters, model, root=N, match="root")


# -- state_dict / load_state_dict -------------------------------------------------------
def _ckpt_loop(cfg, make_opt, comm, start, stop, saved=None, resize="no"):
    """The user's loop on ``comm`` from step ``start`` to ``stop``: a fresh model and wrapper,
    restored from ``saved`` (torch.save bytes: {"model", "opt"}, this rank's or a list of every
    saving rank's) when given.  Returns (flat parameters, this rank's saved bytes, wrapper state)."""
    import io
    d, r = cfg.data, cfg.run
    rank, size = comm.Get_rank(), comm.Get_size()
    shard = load_agent_data(d.dataset, None, d.partition, d.alpha, d.seed, rank=rank, world_size=size)
    spe = comm.allreduce(len(shard.y), op=MPI.MIN) // r.batch_size
    model = build_model(cfg.model.name, shard.input_shape, shard.num_classes, cfg.model.hidden, seed=r.seed)
    X, Y = torch.as_tensor(shard.x).float(), torch.as_tensor(shard.y).long()
    opt = make_opt(model, len(shard.y), comm)
    after = None
    if saved is not None:
        loaded = [torch.load(io.BytesIO(b)) for b in (saved if isinstance(saved, list) else [saved])]
        if len(loaded) == 1:
            model.load_state_dict(loaded[0]["model"])
        try:
            opt.load_state_dict([s["opt"] for s in loaded] if len(loaded) > 1 else loaded[0]["opt"], resize=resize)
        except ValueError:
            opt.close()
            raise
        after = opt.state_dict()["mpidl"]
    for k in range(start, stop):
        idx = torch.from_numpy(batch_indices(len(shard.y), r.batch_size, spe, r.seed, rank, k))
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        opt.step(loss=loss)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()
    opt.close()
    return flat, buf.getvalue(), after


CKPT = {  # case -> (config keys, wrapper on a communicator)
    "cdmsgd": (CASES["cdmsgd-nesterov"][0][:3],
               lambda m, n, c: optim.Consensus(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True),
                                               comm=c)),
    "cdsgd-atc": (CASES["cdsgd-atc-period3"][0],
                  lambda m, n, c: optim.Consensus(torch.optim.SGD(m.parameters(), lr=0.1), form="atc",
                                                  comm_period=3, comm=c)),
    "centralized": (CASES["centralized"][0],
                    lambda m, n, c: optim.Centralized(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5,
                                                                      nesterov=True, weight_decay=0.001), comm=c)),
    "fedavg": (CASES["fedavg"][0],
               lambda m, n, c: optim.FedAvg(torch.optim.SGD(m.parameters(), lr=0.1), period=4, num_samples=n,
                                            comm=c)),
    "lsgd": (CASES["lsgd"][0],
             lambda m, n, c: optim.LeaderSGD(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5), tau_G=4,
                                             window=3, lam_G=0.2, comm=c)),
    "easgd": (CASES["easgd"][0],
              lambda m, n, c: optim.EASGD(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5), tau=3, beta=0.5,
                                          comm=c)),
    "adam": (["algorithm.name=cdsgd"],
             lambda m, n, c: optim.Consensus(torch.optim.Adam(m.parameters(), lr=0.01), comm=c)),
}


@pytest.mark.parametrize("case", list(CKPT))
def test_state_dict_save_load_continue_is_bitwise(case):
    """Save at step 5, a fresh model and wrapper load it (torch.save / torch.load) and go on to
    step 12: bitwise the uninterrupted 12 steps, the wrapper's state included."""
    keys, make = CKPT[case]
    cfg = config.load(None, BASE + keys)
    straight, last, _ = _ckpt_loop(cfg, make, W, 0, STEPS)
    _, mid, _ = _ckpt_loop(cfg, make, W, 0, 5)
    resumed, last2, after = _ckpt_loop(cfg, make, W, 5, STEPS, saved=mid)
    assert_all(after["step"] == 5 and np.array_equal(straight, resumed),
               f"{case}: save at 5 + load + 7 steps differs from 12 straight")
    import io
    a, b = (torch.load(io.BytesIO(x))["opt"]["mpidl"] for x in (last, last2))
    same = all(torch.equal(a["state"][k], b["state"][k]) if isinstance(a["state"][k], torch.Tensor)
               else a["state"][k] == b["state"][k] for k in a["state"])
    assert_all(same and a["step"] == b["step"] == STEPS, f"{case}: the wrapper's state differs at the end")


@pytest.mark.parametrize("case", ["cdmsgd", "lsgd", "easgd", "adam"])
def test_state_dict_resize_4_to_2_and_2_to_4(case):
    """load_state_dict(list of every rank's, resize="average"): the average (the leader, the
    centre) of the saved ranks exactly; resize="no" is one error on every rank."""
    if N != 4:
        pytest.skip("4 ranks: 4 -> 2 and 2 -> 4")
    import io
    keys, make = CKPT[case]
    cfg = config.load(None, BASE + keys)
    two = W.Split(0 if R < 2 else MPI.UNDEFINED, R)
    try:
        for first, second in ((W, two), (two, W)):
            saved = None
            if first != MPI.COMM_NULL:
                _, saved, _ = _ckpt_loop(cfg, make, first, 0, 5)
            every = [b for b in W.allgather(saved) if b is not None]
            ok, msg = True, ""
            if second != MPI.COMM_NULL:
                try:
                    _ckpt_loop(cfg, make, second, 5, 5, saved=every[second.Get_rank() % len(every)])
                    ok, msg = False, "resize=no with another world size did not raise"
                except ValueError as e:
                    ok = ok and 'resize="average"' in str(e)
                    msg = str(e)
                flat, _, after = _ckpt_loop(cfg, make, second, 5, 5, saved=every, resize="average")
                old = [torch.load(io.BytesIO(b))["opt"]["mpidl"] for b in every]
                xs = [o["params"].numpy() for o in old]
                if case == "lsgd":
                    f = [float(np.mean(o["state"]["losses"].numpy()[:o["state"]["nloss"]])) for o in old]
                    want = xs[int(np.argmin(f))]
                elif case == "easgd":
                    want = old[0]["state"]["c"].numpy()
                else:
                    want = pmean(xs, second.Get_size())
                ok = ok and np.array_equal(flat, want) and after["step"] == 5
                if case == "cdmsgd":
                    ok = ok and np.array_equal(after["state"]["v"].numpy(),
                                               pmean([o["state"]["v"].numpy() for o in old], second.Get_size()))
                msg = msg if not ok else ""
            assert_all(ok, f"{case}: {msg or 'resized state differs'}")
    finally:
        if two != MPI.COMM_NULL:
            two.Free()


def test_docs_checkpoint_loop_resumes_bitwise(shared_tmp, monkeypatch):
    """The checkpointing loop of docs/python-api.md: 12 steps, started again to 30, ends bitwise
    equal to 30 steps straight (the script as the docs show it, run in this process)."""
    if N != 2:
        pytest.skip("runs at 2 ranks")
    import os
    import re
    import runpy
    import sys
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "python-api.md").read_text()
    block = re.search(r"```python\n(# own_loop_checkpoint\.py.*?)```", doc, re.S).group(1)
    script = Path(shared_tmp) / "own_loop_checkpoint.py"
    if R == 0:
        script.write_text(block)
    W.Barrier()
    params = {}
    for run, steps in (("straight", 30), ("stopped", 12), ("stopped", 30)):
        os.makedirs(Path(shared_tmp) / run, exist_ok=True)
        monkeypatch.chdir(Path(shared_tmp) / run)
        monkeypatch.setattr(sys, "argv", [str(script), str(steps)])
        g = runpy.run_path(str(script), run_name="__main__")
        params[run] = torch.cat([p.detach().reshape(-1) for p in g["model"].parameters()])
        W.Barrier()
    assert_all(g["start"] == 12 and torch.equal(params["straight"], params["stopped"]),
               "the docs' loop stopped at 12 and resumed differs from 30 straight")
