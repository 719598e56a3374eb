"""A training run for the async kill -9 tests (tests/test_async_resume.py).

``mpiexec -n N python mpidl_async_job.py DUMP a.b=c ...`` trains like ``python -m mpidl run
--set a.b=c ...`` and, once per process right after the algorithm restored its RMA windows from
the (resumed) state and before any local step, every rank reads each window and writes what it
read to ``DUMP/restored_<rank>.npz`` (``<label>_hdr`` = [version, loss, owner, step], all zero
when empty; ``<label>_x`` = the model; labels global, local, center).  Rank 0 prints the final
metrics as one line ``RESULT <json>``.
"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from mpidl import config
from mpidl.algorithms.lsgd import EASGD, LSGD
from mpidl.driver import train

dump, sets = sys.argv[1], sys.argv[2:]
W = MPI.COMM_WORLD


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
            np.savez(os.path.join(dump, f"restored_{W.Get_rank()}.npz"), **got)
            self.lc.barrier()           # nobody writes before everyone has read
    cls._ensure_windows = ensure_windows


spy(LSGD)
spy(EASGD)
res = train(config.load_collective(W, None, sets), W)
if W.Get_rank() == 0:
    print("RESULT " + json.dumps({k: v for k, v in res.items() if isinstance(v, (int, float, str))}), flush=True)
