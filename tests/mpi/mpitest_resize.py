"""Resume on another number of ranks ([run] resize = "average"), every family that supports it.

One launch of 4 ranks: each family trains 10 steps on 4 ranks and resumes on 2 (ranks 0 and 1,
a communicator split off the world), then trains on 2 and resumes on 4.  Right after the
resize every rank's state equals the checkpoint's average (summed as mpidl.resize documents:
new rank p of S sums old ranks p, p + S, ... in float64, then the partial sums are added),
the leader's (LSGD) or the centre (EASGD) exactly; the run then continues to step 16 and its
results file records the resize.  Unsupported combinations raise one error on every rank and
leave the run folder as it was.
"""
import logging
import os
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import assert_all, assert_raises_all, pmean
from mpidl import config
from mpidl import driver
from mpidl.algorithms.base import state_to_dict
from mpidl.checkpoint import CheckpointError, CheckpointStore
from mpidl.h5state import read_tree
from mpidl.layouts import setup_for
from mpidl.resize import ResizeError

MPI_SIZES = (4,)
MPI_TIMEOUT = 400
WORLD = MPI.COMM_WORLD
N, R = WORLD.Get_size(), WORLD.Get_rank()

FAMILIES = {
    "cdsgd": [], "cdmsgd": [], "fedavg": ["algorithm.local_steps=3"],
    "centralized": ["algorithm.momentum=0.9"], "next": ["algorithm.tau=10.0"],
    "lsgd": ["algorithm.tau_G=4", "algorithm.momentum=0.5"], "easgd": ["algorithm.momentum=0.5"],
    "fdg": ["algorithm.stages=2"],
    "lsgd-async": ["algorithm.name=lsgd", "algorithm.tau_G=4", "algorithm.asynchronous=true",
                   "algorithm.deterministic=true"],
    "easgd-async": ["algorithm.name=easgd", "algorithm.asynchronous=true", "algorithm.deterministic=true"],
}


@pytest.fixture(scope="module")
def two():
    c = WORLD.Split(0 if R < 2 else MPI.UNDEFINED, R)
    yield c
    if c != MPI.COMM_NULL:
        c.Free()


def _cfg(out, algo, name, steps, *extra):
    return config.load(None, ["data.dataset=digits", "model.hidden=[16]", "run.batch_size=16",
                              f'run.out="{out}"', "run.log_every=5", "run.eval_every=8", "run.checkpoint_every=10",
                              "data.eval_samples=100", f"algorithm.name={algo.split('-')[0]}", f"run.name={name}",
                              f"run.steps={steps}"] + FAMILIES.get(algo, []) + list(extra))


def _old(folder):
    """Every old rank's state tree of a checkpoint folder, in rank order."""
    files = sorted(Path(folder).glob("rank_*.h5"))
    out = []
    for f in files:
        with h5py.File(f, "r") as h:
            out.append(read_tree(h["state"]))
    return out


def _expected(algo, old, comm, session):
    """{field: array} this rank's state must equal right after the resize."""
    n, S, p = len(old), comm.Get_size(), comm.Get_rank()
    algos = [o["algo"] for o in old]
    if algo == "lsgd-async":     # the model published in the global window (old rank 0 hosts it)
        lead = algos[0]["slot_g"] if algos[0]["slot_hdr_g"][0] > 0 else algos[0]["x"]
        return {"x": lead, "cg": lead}
    if algo == "lsgd":
        f = [float(np.mean(a["losses"][:a["nloss"]])) if a["nloss"] else np.inf for a in algos]
        lead = algos[int(np.argmin(f))]["x"]
        return {"x": lead, "cg": lead}
    if algo.startswith("easgd"):
        return {"x": algos[0]["c"], "c": algos[0]["c"]}
    if algo == "fdg":
        K = session.K
        k, m = session.comm.k, session.comm.m
        members = [a for i, a in enumerate(algos) if i % K == k]
        S, p = session.M, m
    else:
        members = algos
    names = [k for k, v in members[0].items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    return {k: pmean([a[k] for a in members], S) for k in names}


def _resume_and_check(cfg, comm, algo, folder, caplog):
    """On ``comm``: resume (resize) and compare the state; then train on. Returns (ok, message)."""
    session = setup_for(cfg)(cfg, comm)
    try:
        store = CheckpointStore(folder.parent, session.mc)
        counters = {"bytes_before": np.zeros(1), "window": np.zeros(4)}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mpidl"):
            start, event = driver._resume(cfg, session, store, counters)
        got = state_to_dict(session.state)
        want = _expected(algo, _old(folder), comm, session)
        bad = [k for k, v in want.items() if not np.array_equal(np.asarray(got[k]), v)]
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resize:")]
        ok = (start == 10 and not bad and event["from"] != event["to"] == comm.Get_size() and len(said) == 1
              and ("average" in said[0] or "leader" in said[0] or "centre" in said[0]))
        msg = f"{algo}: start {start}, fields differ {bad}, log {said}"
        if not comm.allreduce(ok, op=MPI.LAND):
            return ok, msg
        last = driver._loop(cfg, session, None)
    finally:
        session.close()
    if last["step"] != 16 or not np.isfinite(last["test_acc"]):
        return False, f"{algo}: continued run ended {last}"
    if comm.Get_rank() == 0:
        import json
        with h5py.File(folder.parent.parent / "results.h5", "r") as f:
            events = json.loads(f.attrs["events"])
            ws = int(f.attrs["world_size"])
        if [(e["kind"], e["step"], e["to"]) for e in events] != [("resize", 10, comm.Get_size())] or ws != comm.Get_size():
            return False, f"{algo}: results events {events}, world_size {ws}"
    return True, ""


@pytest.mark.parametrize("algo", list(FAMILIES))
def test_resize_down_and_up(shared_tmp, two, algo, caplog):
    for name, first, second in (("down", WORLD, two), ("up", two, WORLD)):
        if first != MPI.COMM_NULL:
            driver.train(_cfg(shared_tmp, algo, name, 10), first)
        WORLD.Barrier()
        ok, msg = True, ""
        if second != MPI.COMM_NULL:
            folder = Path(shared_tmp) / name / "checkpoints" / "step_00000010"
            cfg = _cfg(shared_tmp, algo, name, 16, 'run.resume="auto"', 'run.resize="average"')
            ok, msg = _resume_and_check(cfg, second, algo, folder, caplog)
        assert_all(ok, f"{name}: {msg}")


def _snapshot(folder):
    out = {}
    for dp, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dp, f)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns, zlib.crc32(open(p, "rb").read()))
    return out


def test_unsupported_is_one_error_and_writes_nothing(shared_tmp, two):
    cases = [  # (name, algo, first-leg extra, second-leg extra, exception, message)
        ("no", "cdsgd", [], ['run.resize="no"'], CheckpointError, '[run] resize = "average"'),
        ("layers", "pdadmm", ["model.hidden=[16, 12, 12]", "run.batch_size=0"],
         ["model.hidden=[16, 12, 12]", "run.batch_size=0"], ResizeError,   # whatever resize says
         "moving layer blocks onto 4 ranks is not implemented"),
        ("stages", "fdg", ["model.hidden=[16, 12, 12]"], ["model.hidden=[16, 12, 12]", "algorithm.stages=4",
                                                      'run.resize="average"'], ResizeError, "keeps the number of stages"),
    ]
    for name, algo, ex1, ex2, exc, match in cases:
        if two != MPI.COMM_NULL:
            driver.train(_cfg(shared_tmp, algo, name, 2, *ex1), two)
        WORLD.Barrier()
        before = _snapshot(Path(shared_tmp) / name) if R == 0 else None
        cfg = _cfg(shared_tmp, algo, name, 4, 'run.resume="auto"', *ex2)
        e = assert_raises_all(exc, driver.train, cfg, WORLD, match=match)
        assert_all(len(str(e).splitlines()) == 1, f"{name}: {e}")
        after = _snapshot(Path(shared_tmp) / name) if R == 0 else None
        assert_all(R != 0 or before == after, f"{name}: the run folder changed")
