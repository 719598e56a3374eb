"""Screening runs of pdADMM accuracy settings (issue 11; 1 rank, the Fashion-MNIST problem).

Runs ``--iters`` iterations of the production algorithm through the pdADMM layout and prints the
test / forward-train accuracy at the ``--eval`` iterations (all 60,000 training images for the
forward train accuracy).  ``--set`` overrides config keys; two variants act from outside the
algorithm: ``--zl pm1|zero`` starts z_L at the +-1 label codes (or 0) of the pdADMM code instead
of the forward pass, and ``--raise fwd_rho|fwd_both`` applies the pdADMM-G code's schedule
(rho, or rho and nu, x10 capped at 1 when the forward-pass training loss fell by less than
``--tol`` in each of the last two iterations).  Results: scr/<tag>.json (or ``--out``).

    python benchmarks/screen_pdadmm.py --set algorithm.tau0=1.0 --tag tau1
"""
import argparse
import dataclasses
import json
import time

import numpy as np
from mpi4py import MPI

from mpidl import config
from mpidl.algorithms.pdadmm_layout import setup_layers

p = argparse.ArgumentParser()
p.add_argument("--iters", type=int, default=12)
p.add_argument("--set", action="append", default=[])
p.add_argument("--zl", default="forward")          # forward | pm1 | zero
p.add_argument("--raise", dest="rr", default="none")  # none | fwd_both | fwd_rho
p.add_argument("--tol", type=float, default=0.01)
p.add_argument("--eval", default="4,8,12")
p.add_argument("--tag", default="")
p.add_argument("--out", default="")
a = p.parse_args()
over = ['algorithm.name="pdadmm"', "model.hidden=[500, 500]", "run.batch_size=0", "algorithm.downsample=2",
        "data.eval_samples=0", 'data.dataset="fashion-mnist"'] + a.set
cfg = config.load(None, over)
s = setup_layers(cfg, MPI.COMM_WORLD)
algo, st = s.algo, s.state
lay = algo._layers[-1]
if a.zl != "forward":
    y = algo.y
    code = np.full(lay.z.shape, -1.0 if a.zl == "pm1" else 0.0, lay.z.dtype)
    if a.zl == "pm1":
        code[np.arange(len(y)), y] = 1.0
    aL = lay.z - lay.R
    lay.z[...] = code
    lay.R[...] = code - aL
ev_at = {int(x) for x in a.eval.split(",")}
costs, out = [], []
t0 = time.time()
for k in range(1, a.iters + 1):
    st, m = algo.step(k, st, None, s.comm)
    need = k in ev_at or a.rr != "none"
    if need:
        ev, _ = s.evaluate(st)
        costs.append(ev["train_loss_forward"])
        row = {"k": k, "test": round(float(ev["test_acc"]), 4), "train": round(float(ev["train_acc_forward"]), 4),
               "fcost": round(float(ev["train_loss_forward"]), 4), "zl": m["loss"], "rho": st.rho, "nu": algo.cfg.nu,
               "rej": (ev["rejected_p_steps"], ev["rejected_W_steps"]), "tauW": st.tau_W.tolist(),
               "taup": st.tau_p.tolist(), "t": round(time.time() - t0, 1)}
        print(row, flush=True)
        out.append(row)
    if a.rr != "none" and k > 3 and costs[-1] > costs[-2] - a.tol and costs[-2] > costs[-3] - a.tol:
        r = min(st.rho * 10, 1.0)
        st.rho = r
        if a.rr == "fwd_both":
            algo.cfg = dataclasses.replace(algo.cfg, nu=min(algo.cfg.nu * 10, 1.0))
with open(a.out or f"scr/{a.tag or 'screen'}.json", "w") as f:
    json.dump({"args": vars(a), "rows": out}, f)
