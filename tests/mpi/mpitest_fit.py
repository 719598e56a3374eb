"""mpidl.fit under mpiexec: the same run as the CLI's config, the result object, bad input on every rank."""
import os

import numpy as np
import torch
from mpi4py import MPI

import mpidl
from mpiutil import assert_all, assert_raises_all
from mpidl import topology as T
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.data import load_dataset, partition
from mpidl.models import build_model

MPI_SIZES = (1, 2, 4)
MPI_TIMEOUT = 400
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
DS = load_dataset("digits")
TRAIN, TEST = (DS.x_train, DS.y_train), (DS.x_test, DS.y_test)
SMALL = dict(steps=20, batch_size=16, log_every=10, eval_samples=100)


def _checkpoint_x(out, name):
    with GraphComm(W, T.complete(N)) as gc:
        store = CheckpointStore(f"{out}/{name}/checkpoints", gc)
        state, _ = store.load(store.latest())
    return np.asarray(state["algo"]["x"])


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def test_fit_equals_the_cli_run_of_the_same_config(shared_tmp):
    """fit(module, arrays) builds the Config a TOML file would: the same run as mpidl.train on the
    npz file of those arrays with the built-in mlp (bitwise), starting from rank 0's weights."""
    npz = os.path.join(shared_tmp, "digits.npz")
    if R == 0:
        np.savez(npz, x_train=DS.x_train, y_train=DS.y_train, x_test=DS.x_test, y_test=DS.y_test)
    W.Barrier()
    cfg = mpidl.Config.from_dict({"data": {"path": npz, "eval_samples": 100},
                                  "model": {"name": "mlp", "hidden": [16]},
                                  "algorithm": {"name": "cdmsgd", "lr": 0.05},
                                  "run": {"steps": 20, "batch_size": 16, "log_every": 10, "out": shared_tmp,
                                          "name": "cli"}})
    cli = mpidl.train(cfg)
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    if R != 0:                                   # other ranks' weights are replaced by rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    res = mpidl.fit(model, TRAIN, TEST, algorithm="cdmsgd", lr=0.05, out=shared_tmp, run_name="fit", **SMALL)
    x_cli = _checkpoint_x(shared_tmp, "cli")
    assert_all(np.array_equal(res.params, x_cli), "fit's run differs from the CLI config's run")
    assert_all(res.metrics["test_acc"] == cli["test_acc"], f"{res.metrics['test_acc']} vs {cli['test_acc']}")
    assert_all(res.model is model and np.array_equal(_flat(model), res.params), "result.model is not trained")
    assert_all(os.path.isfile(res.results_path) and res.out.endswith("fit"), res.results_path)
    assert_all(res.config.model.factory.startswith("memory:") and res.config.data.path.startswith("memory:"),
               "the config names the registered model and data")
    avg = res.average_model()
    expect = W.allreduce(res.params.astype(np.float64)) / N
    assert_all(np.abs(_flat(avg) - expect).max() < 1e-6, "average_model is not the mean of the agents")
    assert_all(avg is not model and np.array_equal(_flat(model), res.params), "average_model changed model")


def test_fit_with_a_factory_learns(shared_tmp):
    def factory(input_shape, num_classes, width=32):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), width),
                                   torch.nn.ReLU(), torch.nn.Linear(width, num_classes))
    tensors = (torch.from_numpy(DS.x_train), torch.from_numpy(DS.y_train))     # tensors work as arrays do
    res = mpidl.fit(factory, tensors, TEST, algorithm="cdmsgd", lr=0.05, steps=60, batch_size=16, width=24,
                    out=shared_tmp, eval_samples=200)
    assert_all(res.metrics["test_acc"] > 0.6, f"test_acc {res.metrics['test_acc']}")
    assert_all(res.model[1].out_features == 24, "factory keyword not passed")
    assert_all(np.array_equal(_flat(res.model), res.params), "model != params")


def test_fit_given_shards_equal_the_iid_split(shared_tmp):
    """partition="given": rank r passes its own rows; the iid split's rows give the iid run, bitwise."""
    idx = partition(DS.y_train, N, "iid", seed=0)[R]
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    a = mpidl.fit(model, TRAIN, TEST, algorithm="cdsgd", lr=0.1, out=shared_tmp, run_name="iid", **SMALL)
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    b = mpidl.fit(model, (DS.x_train[idx], DS.y_train[idx]), TEST, partition="given", algorithm="cdsgd",
                  lr=0.1, out=shared_tmp, run_name="given", **SMALL)
    assert_all(np.array_equal(a.params, b.params), "given shards != the iid run")


def test_fit_builtin_names_and_other_families(shared_tmp):
    res = mpidl.fit("mlp", "digits", algorithm="lsgd", hidden=[16], tau_G=4, out=shared_tmp, cuda_aware=False,
                    **SMALL)
    assert_all(res.metrics["step"] == 20 and np.array_equal(_flat(res.model), res.params), "lsgd via fit")
    assert_all(res.config.comm.cuda_aware == "false", "cuda_aware= reaches [comm]")
    res = mpidl.fit("convex-logistic", (DS.x_train, (DS.y_train > 4).astype(np.int64)),
                    algorithm="next", out=shared_tmp, steps=5, batch_size=0, tau=10.0)
    assert_all(res.model is None and res.params is not None and res.metrics["step"] == 5, "next via fit")


def test_bad_input_is_one_error_on_every_rank(shared_tmp):
    out = os.path.join(shared_tmp, "bad")
    x, y = DS.x_train, DS.y_train
    assert_raises_all(TypeError, mpidl.fit, 42, TRAIN, out=out, match="torch.nn.Module")
    assert_raises_all(TypeError, mpidl.fit, "mlp", [x], out=out, match="(x, y)")
    assert_raises_all(ValueError, mpidl.fit, "mlp", (x, y[:-1]), out=out, match="rows")
    bad_y = y.copy()
    bad_y[3] = -1
    assert_raises_all(ValueError, mpidl.fit, "mlp", (x, bad_y), out=out, match="label -1")
    assert_raises_all(ValueError, mpidl.fit, "mlp", (x, y), num_classes=5, out=out, match="outside")
    err = assert_raises_all(TypeError, mpidl.fit, "mlp", TRAIN, out=out, momentun=0.9, match="momentun")
    assert_all("momentum" in str(err), str(err))
    assert_raises_all(TypeError, mpidl.fit, "mlp", TRAIN, out=out, local_steps=3, match="not a key")
    assert_raises_all(ValueError, mpidl.fit, "mlp", TRAIN, algorithm="cdmsgd", lr=-1.0, out=out, match="lr")
    assert_raises_all(ValueError, mpidl.fit, "mlp", TRAIN, cuda_aware="maybe", out=out, match="cuda_aware")
    # a problem on one rank only is raised on every rank
    assert_raises_all(TypeError, mpidl.fit, 42 if R == N - 1 else "mlp", TRAIN, out=out, match="nn.Module")
    if N > 1:
        mine = (x, y) if R == 0 else (x[:-5], y[:-5])
        assert_raises_all(ValueError, mpidl.fit, "mlp", mine, out=out, match="different")
        other = build_model("mlp", (1, 8, 8), 10, (16 if R == 0 else 17,), seed=0)
        assert_raises_all(ValueError, mpidl.fit, other, TRAIN, out=out, match="different")
    assert_all(not os.path.exists(out), "bad input wrote under out")


def test_rerun_into_the_same_folder_returns_this_runs_model(shared_tmp):
    """A shorter rerun under the same run name (resume="no") returns its own last step, not the older
    run's newer checkpoint."""
    kw = dict(algorithm="cdsgd", lr=0.1, batch_size=16, out=shared_tmp, eval_samples=50)
    mpidl.fit("mlp", TRAIN, TEST, hidden=[8], steps=10, run_name="same", **kw)
    short = mpidl.fit("mlp", TRAIN, TEST, hidden=[8], steps=5, run_name="same", **kw)
    fresh = mpidl.fit("mlp", TRAIN, TEST, hidden=[8], steps=5, run_name="fresh", **kw)
    assert_all(short.metrics["step"] == 5 and np.array_equal(short.params, fresh.params),
               "the rerun returned another run's parameters")
