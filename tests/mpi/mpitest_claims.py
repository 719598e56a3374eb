"""Every claim study of jobs/studies/claims/ (docs/claims.md) parses and runs to completion at a
tiny budget: one seed, a hundredth of an epoch (one to five steps), no warm-up (issue 32)."""
import tomllib

from mpi4py import MPI

from mpiutil import assert_all
from mpidl.claims import load_registry, study_files
from mpidl.study import BUDGETS, compare

MPI_SIZES = (2,)
MPI_TIMEOUT = 600
WORLD = MPI.COMM_WORLD


def tiny(path):
    """The study at a tiny budget: seed 0, 0.01 epochs, one evaluation at the end."""
    d = tomllib.loads(path.read_text())
    for k in BUDGETS:
        d.pop(k, None)
    d.update(seeds=[0], epochs=0.01, warmup=False)
    d["run"] = dict(d.get("run", {}), eval_every=10**6, checkpoint_every=10**6)
    for m in d["method"]:
        if "run" in m:
            m["run"] = {k: v for k, v in m["run"].items() if k not in ("eval_every", "checkpoint_every")}
    return d


def test_every_claim_study_runs_at_a_tiny_budget(shared_tmp):
    used = {c["study"] for c in load_registry() if "study" in c}
    files = study_files()
    assert_all(used == {p.stem for p in files}, f"registry studies {sorted(used)} vs files {[p.stem for p in files]}")
    for path in files:
        d = tiny(path)
        res = compare(d, WORLD, out=f"{shared_tmp}/{path.stem}")
        names = [m.get("name", m["algorithm"]) for m in d["method"]]
        got = {n: res["summary"][n]["final_test_acc"]["n"] for n in names}
        assert_all(not res["stopped"] and got == {n: 1 for n in names}, f"{path.stem}: {got}")
