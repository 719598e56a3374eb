"""pdADMM through the one driver loop: exact resume and one clear error on every rank."""
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import config
from mpidl import topology as T
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.driver import train
from mpidl.errors import MpidlError

MPI_SIZES = (1, 2, 3)
MPI_TIMEOUT = 400
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()


def _cfg(out, *extra):
    return config.load(None, ["data.dataset=digits", "model.hidden=[16, 12]", "run.batch_size=0",
                              f'run.out="{out}"', "run.log_every=5", "run.eval_every=10",
                              "data.eval_samples=200", "algorithm.rho=0.01", "algorithm.nu=0.01"]
                       + list(extra))


def _final_state(out, name, step):
    with GraphComm(WORLD, T.complete(N)) as gc:
        state, _ = CheckpointStore(f"{out}/{name}/checkpoints", gc).load(step)
    return state["algo"]


@pytest.mark.parametrize("algo", ["pdadmm", "pdadmm-q"])
def test_resume_is_bitwise(shared_tmp, algo):
    extra = [f'algorithm.name="{algo}"', "run.steps=20", "run.checkpoint_every=10", "algorithm.rho_raise=true",
             "algorithm.rho_tol=1e-3"]
    if algo == "pdadmm-q":
        extra.append("algorithm.quantize_p=true")
    straight = train(_cfg(shared_tmp, *extra, "run.name=straight"), WORLD)
    first = train(_cfg(shared_tmp, *extra, "run.name=resumed"), WORLD, max_steps=10)
    assert_all(first["step"] == 10 and first["stop"] == "max_steps", f"first leg {first}")
    second = train(_cfg(shared_tmp, *extra, "run.name=resumed", "run.resume=auto"), WORLD)
    assert_all(second["step"] == 20, f"second leg {second}")
    a, b = _final_state(shared_tmp, "straight", 20), _final_state(shared_tmp, "resumed", 20)
    same = all(np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True) for k in a)
    assert_all(same, f"{algo}: 10 + resume 10 differs from 20 straight")
    assert_all(straight["test_acc"] == second["test_acc"], "final metrics differ")
    assert_all(straight["test_acc"] > 0.3, f"{algo} did not learn: test acc {straight['test_acc']}")


def test_bad_inputs_are_one_error_everywhere(shared_tmp):
    if N >= 3:
        assert_raises_all(MpidlError, train, _cfg(shared_tmp, "algorithm.name=pdadmm", "model.hidden=[8]"),
                          WORLD, match="at most one rank per layer")
    assert_raises_all(MpidlError, train, _cfg(shared_tmp, "algorithm.name=pdadmm", "model.name=cnn"),
                      WORLD, match="trains an MLP")
    assert_raises_all(MpidlError, train, _cfg(shared_tmp, "algorithm.name=pdadmm", "model.hidden=[100000000, 8]"),
                      WORLD, match="GiB")
    assert_raises_all(MpidlError, train, _cfg(shared_tmp, "algorithm.name=pdadmm", "run.batch_size=32"),
                      WORLD, match="full batch")
    for bad, match in (("algorithm.rho=0.0", "rho must be > 0"), ("algorithm.nu=-1.0", "nu must be > 0"),
                       ("algorithm.grid_points=1", "cannot hold"), ("algorithm.grid_hi=-0.5", "cannot hold")):
        assert_raises_all(MpidlError, config.load_collective, WORLD, None,
                          ["algorithm.name=pdadmm-q", bad], match=match)
