"""A toy training loop for the preemption tests: ``mpiexec -n N python preempt_job.py ROOT STEPS [--resume]``.

Each step mixes x over a ring and adds noise from a per-rank generator.  After
two steps every rank writes ROOT/ready_<rank> (its pid).  On an agreed stop
request it saves a checkpoint, writes ROOT/stopped_<rank> and exits 0; at the
end it writes ROOT/final_<rank>.npy.  ``--resume`` starts from the newest
complete checkpoint.
"""
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from mpidl import topology as T
from mpidl.checkpoint import CheckpointStore, PreemptionGuard, rng_state, set_rng_state
from mpidl.comm import GraphComm

root, total = sys.argv[1], int(sys.argv[2])
W = MPI.COMM_WORLD
gc = GraphComm(W, T.ring(W.Get_size()))
store = CheckpointStore(os.path.join(root, "ckpt"), gc, keep=2)
rng = np.random.default_rng(100 + gc.rank)
x = np.zeros(4)
k0 = 0
if "--resume" in sys.argv:
    step = store.latest()
    if step is not None:
        state, meta = store.load(step, like={"x": x, "rng": rng_state(rng)}, expect={"algorithm": "toy"})
        x, k0 = state["x"], step
        set_rng_state(state["rng"], rng)


def mark(name, text):
    with open(os.path.join(root, f"{name}_{gc.rank}"), "w") as f:
        f.write(text)


with PreemptionGuard(gc) as guard:
    for k in range(k0, total):
        x = gc.mix(x) + rng.standard_normal(4)
        if k == k0 + 2:
            mark("ready", str(os.getpid()))
        time.sleep(0.01)
        if guard.should_stop():
            store.save(k + 1, {"x": x, "rng": rng_state(rng)}, {"algorithm": "toy"})
            mark("stopped", str(k + 1))
            sys.exit(0)
np.save(os.path.join(root, f"final_{gc.rank}.npy"), x)
