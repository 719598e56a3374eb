"""``mpidl bench`` under mpiexec, run in-process through ``mpidl.__main__.main``.

The consensus demo's error must fall at least as fast as (1 - gap)^k; a tiny
``bench mix`` must produce one table row per (topology, dtype, P) with finite
positive times, and GraphComm.mix must agree with the bare-MPI floor.
"""
import contextlib
import io
import json
import os
import re
import tempfile

import numpy as np
from mpi4py import MPI

from mpiutil import assert_all
from mpidl.__main__ import main

MPI_SIZES = (1, 2, 3)
MPI_TIMEOUT = 180
W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()


def _run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def _shared_tmpdir():
    path = W.bcast(tempfile.mkdtemp(prefix="mpidl-bench-") if R == 0 else None)
    return path


def test_consensus_error_decays_at_predicted_rate():
    # ring(3) is the complete graph (exact after one round); path(3) has gap 1/3
    topo = "path" if N == 3 else "ring"
    rounds = 8
    rc, out = _run(["bench", "consensus", "--topology", topo, "--rounds", str(rounds), "--dim", "64"])
    assert_all(rc == 0, f"bench consensus exited {rc}")
    ok, msg = True, ""
    if R == 0:
        rows = [ln.split() for ln in out.splitlines() if re.match(r"^\s*\d+(\s+[0-9.eE+-]+){3}\s*$", ln)]
        errs = np.array([float(r[1]) for r in rows])
        bound = np.array([float(r[3]) for r in rows])
        final = [ln for ln in out.splitlines() if ln.startswith("final:")]
        rate = float(re.search(r"rate per round 1 - gap = \|lambda_2\| = ([0-9.]+)", out).group(1))
        ok = len(rows) == rounds + 1 and len(final) == 1
        if ok and errs[0] > 0:
            # symmetric W: ||x_k - xbar|| <= |lambda_2|^k ||x_0 - xbar||
            ok &= bool(np.all(errs <= errs[0] * bound * (1 + 1e-6) + 1e-12 * errs[0]))
            ok &= bool(errs[-1] < errs[0])
            ok &= bool(np.allclose(bound, rate ** np.arange(rounds + 1), rtol=1e-3))
        elif ok:  # one agent: already at consensus
            ok &= N == 1 and bool(np.all(errs == 0)) and "exact consensus" in final[0]
        msg = out[-2000:]
    assert_all(ok, f"consensus output not sane:\n{msg}")


def test_tiny_mix_table_rows_and_agreement():
    d = _shared_tmpdir()
    js, md = os.path.join(d, "mix.json"), os.path.join(d, "mix.md")
    rc, out = _run(["bench", "mix", "--sizes", "1000", "--dtypes", "float32,float64",
                    "--topologies", "ring,exponential", "--repeats", "2", "--warmup", "1",
                    "--methods", "mix,floor,gather,allreduce", "--json", js, "--out", md])
    assert_all(rc == 0, f"bench mix exited {rc}")
    W.Barrier()
    ok, msg = True, ""
    if R == 0:
        res = json.load(open(js))
        rows = res["rows"]
        keys = {(r["topology"], r["dtype"], r["P"]) for r in rows}
        ok = len(rows) == 4 and len(keys) == 4 and all(r["N"] == N for r in rows)
        for r in rows:
            med = r["median_s"]
            ok &= set(med) == {"mix", "floor", "gather", "allreduce"}
            ok &= all(np.isfinite(v) and v > 0 for v in med.values())
            ok &= all(len(t) == 2 for t in r["times_s"].values())
            tol = 1e-4 if r["dtype"] == "float32" else 1e-10
            ok &= r["mix_vs_floor_relerr"] <= tol
        table = [ln for ln in out.splitlines() if ln.startswith("| ")]
        ok &= len(table) == 1 + 4 and table[0].split("|")[-3].strip() == "a/b"
        ok &= res["facts"]["ranks"] == N and open(md).read().count("\n| ") == 1 + 4
        msg = out[-3000:]
    assert_all(ok, f"bench mix output not sane:\n{msg}")


def test_bad_arguments_exit_2_everywhere():
    for argv in (["bench", "mix", "--sizes", "abc"], ["bench", "mix", "--dtypes", "int8"],
                 ["bench", "mix", "--methods", "magic"]):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            rc, _ = _run(argv)
        assert_all(rc == 2, f"{argv}: exit {rc}")
        assert_all(R != 0 or "error" in err.getvalue(), f"{argv}: no message")
