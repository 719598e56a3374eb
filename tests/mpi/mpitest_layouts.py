"""The driver serves a family with its own rank layout (mpidl.layouts): a toy family.

The toy family's ranks form a path; only the last rank reports a loss (like a
pipeline's last stage or pdADMM's last layer), the state is one array per rank,
evaluation is a collective of the family's own, and extra state travels in the
checkpoint.  The expected numbers are computed here from the toy's definition.
"""
from dataclasses import dataclass

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all
from mpidl import config
from mpidl import topology as T
from mpidl.comm import GraphComm
from mpidl.driver import train
from mpidl.layouts import Session

MPI_SIZES = (1, 2, 3)
MPI_TIMEOUT = 200
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()


@dataclass(frozen=True)
class ToyConfig:
    name: str = "toy-layout"
    spe: int = 4

    def validate(self):
        if self.spe < 1:
            raise ValueError("spe must be >= 1")


@dataclass
class ToyState:
    x: np.ndarray
    k_seen: int


class Toy:
    name = "toy-layout"
    state_cls = ToyState

    def step(self, k, state, oracle, comm):
        state.x += comm.rank + 1.0          # rank r adds r + 1 per step
        state.k_seen = k + 1
        comm.bytes_sent += 8
        last = comm.rank == comm.size - 1
        return state, {"loss": float(k) if last else None, "acc": 0.5 if last else None}


class ToySession(Session):
    def __init__(self, cfg, world):
        self.mc = GraphComm(world, T.path(world.Get_size()))
        self.comm = GraphComm(world, T.path(world.Get_size()))
        self.algo = Toy()
        self.state = ToyState(x=np.zeros(3), k_seen=0)
        self.steps_per_epoch = cfg.algorithm.spe
        self.expect = {"algorithm": "toy-layout", "roles": f"path:{world.Get_size()}"}
        self.buf = np.zeros(2)

    def extra_state(self):
        return {"buf": self.buf}

    def load_extra_state(self, d):
        self.buf[...] = d["buf"]

    def before_step(self, k):
        self.buf[0] = k

    def evaluate(self, state):
        total = self.mc.allreduce(float(state.x[0]))
        return {"test_acc": total, "test_loss": -total}, None

    def close(self):
        self.mc.close()
        self.comm.close()


config.register_algorithm("toy-layout", ToyConfig, None, layout=ToySession)


def _cfg(out, *extra):
    return config.load(None, ["algorithm.name=toy-layout", f'run.out="{out}"', "run.log_every=3",
                              "run.eval_every=4", "run.checkpoint_every=5"] + list(extra))


def test_driver_serves_a_custom_layout(shared_tmp):
    res = train(_cfg(shared_tmp, "run.steps=10", "run.name=straight"), WORLD)
    steps_done = 10
    expect_x0 = steps_done * sum(r + 1.0 for r in range(N))
    assert_all(res["step"] == 10 and res["stop"] == "done", str(res))
    assert_all(res["test_acc"] == expect_x0, f"{res['test_acc']} != {expect_x0}")
    if R == 0:
        with h5py.File(f"{shared_tmp}/straight/results.h5") as f:
            st = list(f["train/step"][()])
            tl = list(f["train/train_loss"][()])
            ta = list(f["train/train_acc"][()])
            bs = list(f["train/bytes_sent"][()])
            es = list(f["eval/step"][()])
        assert st == [3, 6, 9, 10], st
        # only the last rank reports; window means of k over steps (1..3), (4..6), (7..9), (10)
        assert tl == [1.0, 4.0, 7.0, 9.0], tl
        assert ta == [0.5] * 4, ta
        assert bs == [8.0 * N * s for s in st], bs
        assert es == [4, 8, 10], es


def test_custom_layout_resumes_exactly(shared_tmp):
    first = train(_cfg(shared_tmp, "run.steps=10", "run.name=resumed"), WORLD, max_steps=5)
    assert_all(first["step"] == 5 and first["stop"] == "max_steps", str(first))
    second = train(_cfg(shared_tmp, "run.steps=10", "run.name=resumed", "run.resume=auto"), WORLD)
    assert_all(second["step"] == 10, str(second))
    expect_x0 = 10 * sum(r + 1.0 for r in range(N))
    assert_all(second["test_acc"] == expect_x0, f"resumed x {second['test_acc']} != {expect_x0}")
    # the resume at step 5 falls inside the training window of steps 4..6 and after 5 x 8 bytes
    # per rank: the driver's checkpointed window and byte offset make the rows equal a straight run's
    rows = None
    if R == 0:
        with h5py.File(f"{shared_tmp}/resumed/results.h5") as f:
            rows = (list(f["train/step"][()]), list(f["train/train_loss"][()]), list(f["train/bytes_sent"][()]))
    rows = WORLD.bcast(rows)
    assert_all(rows[0] == [3, 6, 9, 10] and rows[1] == [1.0, 4.0, 7.0, 9.0], str(rows))
    assert_all(rows[2] == [8.0 * N * s for s in rows[0]], str(rows))


def test_summary_of_run_without_evaluation(shared_tmp):
    res = train(_cfg(shared_tmp, "run.steps=10", "run.name=short", "run.eval_every=100"), WORLD, max_steps=2)
    assert_all(res["evaluated"] is False and "test_acc" not in res, str(res))
