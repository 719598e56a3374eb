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
