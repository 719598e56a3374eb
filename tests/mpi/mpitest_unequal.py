"""Unequal shards under mpiexec: every rank runs the same steps per epoch; convex models on the
wrong labels are one config error on every rank before step 0 (nothing written under run.out)."""
import os

import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import config
from mpidl.data import load_agent_data
from mpidl.driver import train

MPI_SIZES = (3,)
MPI_TIMEOUT = 300
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()


def _cfg(out, *extra):
    return config.load(None, ["data.dataset=digits", "model.hidden=[8]", "run.batch_size=16",
                              f'run.out="{out}"', "run.log_every=5", "data.eval_samples=50",
                              "run.checkpoint_every=1000"] + list(extra))


@pytest.mark.parametrize("scheme", ["by-class", "dirichlet"])
def test_steps_per_epoch_is_the_smallest_shards(shared_tmp, scheme):
    cfg = _cfg(shared_tmp, f"data.partition={scheme}", "data.alpha=0.3", "run.epochs=1",
               f"run.name={scheme}")
    shard = load_agent_data("digits", None, scheme, 0.3, 0, rank=R, world_size=N)
    sizes = WORLD.allgather(len(shard.y))
    assert_all(len(set(sizes)) > 1, f"shards not unequal: {sizes}")
    res = train(cfg, WORLD)
    want = min(sizes) // 16
    got = WORLD.allgather((res["steps_per_epoch"], res["steps"], res["step"]))
    assert_all(got == [(want, want, want)] * N, f"sizes {sizes}: (spe, steps, step) per rank {got}")


@pytest.mark.parametrize("model,match", [("convex-logistic", "needs a dataset with 2 classes"),
                                         ("convex-lsq", "fits real-valued targets")])
def test_convex_model_on_multiclass_data_is_one_config_error(shared_tmp, model, match):
    out = os.path.join(shared_tmp, "cvx")
    cfg = _cfg(out, f'model.name="{model}"', "algorithm.name=next", "run.steps=2")
    assert_raises_all(config.ConfigError, train, cfg, WORLD, match=match)
    assert_all(not os.path.exists(out), f"{out} was created")
