"""The scaling model's formulas (benchmarks/scaling_model.py) on hand-computed cases, and
docs/scaling.md's projection table against the model code (docs/scaling.md, issue 29)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import scaling_model as M  # noqa: E402

BEGIN = "<!-- projection table: benchmarks/scaling_model.py projection_table() -->"
END = "<!-- end of projection table -->"


def test_collectives():
    assert M.log2c(1) == 0 and M.log2c(2) == 1 and M.log2c(5) == 3 and M.log2c(1024) == 10
    assert M.allreduce(1000, 1) == (0.0, 0)
    assert M.allreduce(1000, 4) == (1500.0, 4)          # 2 * 3/4 * 1000, 2 log2 4
    assert M.allreduce(1000, 5) == (1600.0, 6)          # 2 * 4/5 * 1000, 2 ceil(log2 5)
    assert M.bcast(1000, 2) == (1000.0, 1)              # one send
    assert M.bcast(1000, 8) == (1750.0, 6)              # scatter + allgather


def test_traffic_per_family():
    w = M.Workload(model_bytes=1000, act_bytes=100, local_steps=10, tau_G=16, tau=4)
    assert M.traffic("cdmsgd", 2, w) == (1000.0, 1.0, 1000.0)     # a 2-ring: one neighbour
    assert M.traffic("cdmsgd", 8, w) == (2000.0, 1.0, 2000.0)     # two neighbours, one round
    assert M.traffic("next", 8, w) == (4000.0, 1.0, 4000.0)       # iterate + tracker
    assert M.traffic("centralized", 4, w) == (1500.0, 4.0, 1500.0)
    assert M.traffic("fedavg", 4, w) == (150.0, 0.4, 150.0)       # one allreduce per 10 steps
    assert M.traffic("easgd", 4, w) == (375.0, 1.0, 375.0)        # one per tau = 4
    w16 = M.Workload(model_bytes=1600, tau_G=16)
    # broadcast 2 * 3/4 * 1600 = 2400 bytes, 4 rounds, + the election's 4 rounds, every 16 steps;
    # counted at the root only: 3 * 1600, i.e. 3/4 * 1600 per rank
    assert M.traffic("lsgd", 4, w16) == (150.0, 0.5, 75.0)
    # fdg, K = 2, M = 4: activation 100 + allreduce of a 500-byte stage over 4 (750 bytes, 4 rounds)
    assert M.traffic("fdg", 8, w) == (850.0, 5.0, 100.0 + 1500.0 / 2)
    assert M.traffic("fdg", 8, M.Workload(model_bytes=1000, act_bytes=100, stage_bytes=800))[0] == 1300.0
    assert M.traffic("centralized", 1, w) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown family"):
        M.traffic("sgd", 4, w)


def test_times():
    w = M.Workload(model_bytes=1.25e6)
    fab = M.Fabric("f", 1e9, 10e-6)
    # 2 neighbours x 1.25 MB = 2e7 bits at 1e9 bit/s = 20 ms, + one 10 us round
    assert M.t_comm("cdmsgd", 4, w, fab) == pytest.approx(0.02001)
    assert M.t_comm("cdmsgd", 4, w, M.Fabric("f", 1e9, 0.0, 1.5)) == pytest.approx(0.03)
    assert M.t_step(0.010, 0.020) == pytest.approx(0.030)
    assert M.t_step(0.010, 0.020, 0.5) == pytest.approx(0.025)
    assert M.t_step(0.010, 0.020, 1.0) == pytest.approx(0.020)    # max(compute, comm)
    with pytest.raises(ValueError, match="overlap"):
        M.t_step(0.01, 0.02, 1.5)
    assert M.efficiency("cdmsgd", 4, w, fab, 0.02001) == pytest.approx(0.5)


def test_doc_projection_table_is_the_models():
    text = (ROOT / "docs" / "scaling.md").read_text()
    assert BEGIN in text and END in text, "docs/scaling.md lost its projection table markers"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    want = M.projection_table().strip()
    assert table == want, ("docs/scaling.md's projection table differs from the model's; regenerate "
                           "it with: python benchmarks/scaling_model.py")
