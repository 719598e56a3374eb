"""A training run for the async kill -9 tests (tests/test_async_resume.py).

``mpiexec -n N python mpidl_async_job.py DUMP a.b=c ... [--next a.b=c ...]...`` trains like
``python -m mpidl run --set a.b=c ...``, one run after the other in the same processes (``--next``
starts the next run's settings; one launch saves the start-up of several runs).  In each run,
right after the algorithm restored its RMA windows from the (resumed) state and before any local
step, every rank reads each window and writes what it read to ``DUMP/restored_<run>_<rank>.npz``
(``<label>_hdr`` = [version, loss, owner, step], all zero when empty; ``<label>_x`` = the model;
labels global, local, center; ``<run>`` = ``run.name``).  After each run rank 0 prints its final
metrics as one line ``RESULT <run> <json>``.
"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from mpidl import config
from mpidl.algorithms.lsgd import EASGD, LSGD
from mpidl.driver import train

dump = sys.argv[1]
W = MPI.COMM_WORLD
runs = [[]]
for arg in sys.argv[2:]:
    if arg == "--next":
        runs.append([])
    else:
        runs[-1].append(arg)
current = {}


def windows(algo):
    if isinstance(algo, EASGD):
        return {"center": algo.win_c}
    out = {"global": algo.win_g}
    if algo.win_l is not None:
        out["local"] = algo.win_l
    return out


def spy(cls):
    ensure = cls._ensure_windows

    def ensure_windows(self, state):
        first = self._first
        ensure(self, state)
        if first:
            got = {}
            for label, win in windows(self).items():
                buf = np.zeros_like(state.x)
                hdr = win.read(buf, charge=False)
                got[f"{label}_hdr"] = np.zeros(4) if hdr is None else np.array(hdr)
                got[f"{label}_x"] = buf
            np.savez(os.path.join(dump, f"restored_{current['run']}_{W.Get_rank()}.npz"), **got)
            self.lc.barrier()           # nobody writes before everyone has read
    cls._ensure_windows = ensure_windows


spy(LSGD)
spy(EASGD)
for sets in runs:
    cfg = config.load_collective(W, None, sets)
    current["run"] = cfg.run.name
    res = train(cfg, W)
    if W.Get_rank() == 0:
        res = {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
        print(f"RESULT {cfg.run.name} {json.dumps(res)}", flush=True)
