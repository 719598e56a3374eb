"""`mpidl compare` under mpiexec: the driver's should_stop hook stops every rank at one step, and
compare() runs a small study through the one driver (issue 22)."""
import json
import os

import h5py
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all
from mpidl import config
from mpidl.checkpoint import CheckpointStore
from mpidl.comm import GraphComm
from mpidl.driver import train
from mpidl.study import StudyError, compare
from mpidl import topology as T

MPI_SIZES = (1, 2, 3)
MPI_TIMEOUT = 400
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()


def _cfg(out, *extra):
    return config.load(None, ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16",
                              f'run.out="{out}"', "run.log_every=5", "run.eval_every=50", "run.steps=60",
                              "run.checkpoint_every=50", "data.eval_samples=100", "algorithm.name=cdmsgd"]
                       + list(extra))


def test_should_stop_on_one_rank_stops_all_at_the_same_step(shared_tmp):
    seen = []

    def hook(k, row):  # only the last rank asks to stop, at step 20: every rank must stop there
        seen.append((k, sorted(row)))
        return R == N - 1 and k >= 20
    res = train(_cfg(shared_tmp, "run.name=hook"), WORLD, should_stop=hook)
    steps = WORLD.allgather(res["step"])
    assert_all(steps == [20] * N and res["stop"] == "budget", f"stopped at {steps}, {res['stop']}")
    assert_all([k for k, _ in seen] == [5, 10, 15, 20], f"asked at {seen}")
    assert_all({"wall", "bytes_sent", "epoch", "train_loss"} <= set(seen[0][1]), f"row keys {seen[0][1]}")
    with GraphComm(WORLD, T.complete(N)) as gc:
        latest = CheckpointStore(f"{shared_tmp}/hook/checkpoints", gc).latest()
    assert_all(latest == 20, f"newest checkpoint {latest}: the stop step must be saved")
    if R == 0:
        with h5py.File(f"{shared_tmp}/hook/results.h5") as f:
            assert list(f["eval/step"][()]) == [20], "the stop step must be evaluated"
            assert f["train/step"][()][-1] == 20


def test_without_hook_runs_to_the_end(shared_tmp):
    res = train(_cfg(shared_tmp, "run.name=plain"), WORLD)
    assert_all(res["step"] == 60 and res["stop"] == "done", str(res.get("stop")))


def test_compare_wall_budget_and_bad_study(shared_tmp):
    study = {"seeds": [3], "wall_seconds": 0.5, "data": {"dataset": "digits", "eval_samples": 100},
             "model": {"hidden": [16]}, "run": {"batch_size": 16, "log_every": 5, "eval_every": 20},
             "method": [{"algorithm": "cdmsgd", "lr": 0.05}, {"name": "c2", "algorithm": "centralized"}]}
    if N >= 2:
        study["topology"] = {"name": "ring"}
    res = compare(study, WORLD, out=f"{shared_tmp}/s")
    assert_all(not res["stopped"] and set(res["summary"]) == {"cdmsgd", "c2"}, str(res))
    for m in ("cdmsgd", "c2"):
        d = f"{shared_tmp}/s/{m}/seed3"
        if R == 0:
            with open(f"{d}/done.json") as f:
                done = json.load(f)
            # the machine facts, collective over the world, at this size (1 node here)
            assert done["stop"] == "budget" and done["machine"]["ranks"] == N, done
            assert done["machine"]["nodes"] == 1 and done["machine"]["ranks_per_node"] == [N], done
            assert done["load"]["samples"] >= 2, done
            with h5py.File(f"{d}/results.h5") as f:
                cfg = json.loads(f.attrs["config"])
                wall = f["train/wall"][()]
                assert cfg["run"]["seed"] == 3 and cfg["data"]["seed"] == 3, cfg
                assert wall[-1] >= 0.5 and (len(wall) < 2 or wall[-2] < 0.5), wall  # stops at the first row past it
    bad = dict(study, method=[{"algorithm": "nosuch"}])
    assert_raises_all(StudyError, compare, bad, WORLD, out=f"{shared_tmp}/bad", match="unknown algorithm 'nosuch'")
    assert_all(not os.path.exists(f"{shared_tmp}/bad"), "a bad study must not create its out folder")
