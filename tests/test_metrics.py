"""Results files, progress display, report and `mpidl report` (serial)."""
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mpidl.__main__ import main as cli
from mpidl.errors import MpidlError
from mpidl.metrics import Progress, Recorder, consensus_error, load_results, report
from mpidl.checkpoint import _Solo


def _run(path, algo, steps=30, offset=0.0, **kw):
    rec = Recorder(path, None, {"algorithm": algo, "lr": 0.1, "topology": {"name": "ring"}}, **kw)
    for k in range(1, steps + 1):
        rec.log("train", k, loss=1.0 / k + offset, acc=1 - 1.0 / k, consensus_error=np.exp(-k / 3.0),
                bytes_sent=1000 * k)
        if k % 10 == 0:
            rec.log("eval", k, test_acc=0.5 + k / 100, agent_acc=np.array([0.4, 0.5, 0.6]) + k / 100,
                    wall=0.01 * k, **{f"agent{i:03d}_loss": 1.0 / k + i for i in range(3)})
    return rec


def test_recorder_writes_series_and_config(tmp_path):
    path = tmp_path / "r.h5"
    rec = _run(str(path), "cdsgd", flush_every=7)
    assert not path.exists() and Path(str(path) + ".tmp").exists()  # renamed at close
    rec.close()
    rec.close()  # idempotent
    assert path.exists() and not Path(str(path) + ".tmp").exists()
    d = load_results(path)
    assert d["config"] == {"algorithm": "cdsgd", "lr": 0.1, "topology": {"name": "ring"}}
    tr, ev = d["series"]["train"], d["series"]["eval"]
    assert np.array_equal(tr["step"], np.arange(1, 31)) and tr["step"].dtype == np.int64
    assert np.allclose(tr["loss"], 1.0 / np.arange(1, 31)) and np.all(np.diff(tr["wall_time"]) >= 0)
    assert ev["agent_acc"].shape == (3, 3) and np.allclose(ev["test_acc"], [0.6, 0.7, 0.8])
    assert d["label"] == "r" and d["attrs"]["world_size"] == 1


def test_missing_columns_are_nan_and_bad_values_rejected(tmp_path):
    rec = Recorder(tmp_path / "r.h5", None, {})
    rec.log("train", 1, loss=1.0)
    rec.log("train", 2, acc=0.5)
    rec.flush()
    rec.log("train", 3, loss=3.0, extra=7)
    with pytest.raises(TypeError, match="number or a 1-D numeric array"):
        rec.log("train", 4, loss="high")
    with pytest.raises(ValueError, match="bad column"):
        rec.log("train", 4, **{"a/b": 3})
    rec.close()
    tr = load_results(tmp_path / "r.h5")["series"]["train"]
    assert np.array_equal(tr["loss"], [1.0, np.nan, 3.0], equal_nan=True)
    assert np.array_equal(tr["acc"], [np.nan, 0.5, np.nan], equal_nan=True)
    assert np.array_equal(tr["extra"], [np.nan, np.nan, 7.0], equal_nan=True)


def test_crash_leaves_readable_tmp_and_resume_truncates(tmp_path):
    path = str(tmp_path / "r.h5")
    rec = _run(path, "cdsgd", steps=25, flush_every=5)
    rec.flush()
    rec._file.close()  # a crash: no close(), no rename
    d = load_results(path)  # falls back to the .tmp
    assert d["path"].endswith(".tmp") and d["series"]["train"]["step"][-1] == 25
    rec = Recorder(path, None, None, resume=True, resume_step=12)
    assert rec.elapsed() >= d["series"]["train"]["wall_time"][11]
    rec.log("train", 13, loss=0.5)
    rec.close()
    d = load_results(path)
    assert list(d["series"]["train"]["step"]) == list(range(1, 14))
    assert list(d["series"]["eval"]["step"]) == [10]
    assert d["config"]["algorithm"] == "cdsgd"  # resume without a config keeps it
    # resume a finished file: it stays intact until close
    rec = Recorder(path, None, {"algorithm": "cdsgd"}, resume=5)
    assert len(load_results(path)["series"]["train"]["step"]) == 13
    rec.close()
    assert len(load_results(path)["series"]["train"]["step"]) == 5


def test_recorder_open_errors(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(MpidlError, match="cannot open results file"):
        Recorder(tmp_path / "f" / "r.h5", None, {})
    (tmp_path / "junk.h5").write_bytes(b"junk" * 100)
    with pytest.raises(MpidlError, match="cannot open results file"):
        Recorder(tmp_path / "junk.h5", None, {}, resume=3)
    with pytest.raises(MpidlError, match="not found"):
        load_results(tmp_path / "none.h5")


def test_consensus_error_one_agent():
    assert consensus_error(_Solo(), np.arange(5.0)) == 0.0


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_progress_line_mode():
    logger = logging.getLogger("mpidl.progress")  # the CLI's log.setup() may have run already
    h, old = _Collect(), (logger.level, logger.propagate)
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        p = Progress(100, None, every=25, stream=io.StringIO())
        for k in range(1, 101):
            p.update(k, loss=1.0 / k, acc=0.5)
        p.close()
    finally:
        logger.removeHandler(h)
        logger.setLevel(old[0])
        logger.propagate = old[1]
    lines = h.lines
    assert len(lines) == 4 and lines[-1].startswith("step 100/100 loss 0.01 acc 0.5") and "ETA" in lines[0]


def test_progress_bar_on_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    s = Tty()
    with Progress(10, None, stream=s, min_interval=0.0, start=2) as p:
        for k in range(3, 11):
            p.update(k, loss=0.25)
    text = s.getvalue()
    assert text.count("\r[") == 8 and "10/10 loss 0.25" in text and "#" * 28 in text and text.endswith("\n")


def test_report_makes_table_and_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    _run(a, "cdsgd").close()
    _run(b, "fedavg", offset=0.2).close()
    out = report([a, b], tmp_path / "rep")
    table = capsys.readouterr().out
    assert "cdsgd" in table and "fedavg" in table and " loss " in table and "best test_acc" in table
    names = sorted(os.path.basename(p) for p in out["plots"])
    assert names == ["eval_agent_acc.png", "eval_agents_loss.png", "eval_test_acc.png", "train_acc.png",
                     "train_consensus_error.png", "train_loss.png"]
    for p in out["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 5000
    assert Path(out["summary"]).read_text().strip() == out["table"]
    assert cli(["report", a, "--out", str(tmp_path / "rep2")]) == 0
    assert len(list((tmp_path / "rep2").glob("*.png"))) == 6
    assert cli(["report", str(tmp_path / "none.h5")]) == 2


def test_events_are_recorded_listed_and_truncated_on_resume(tmp_path):
    """A resize event lands in the file's ``events`` attribute at once, the summary table lists it,
    and a resume from an earlier step drops the events after that step."""
    import json
    from mpidl.plots import summary_table
    path = tmp_path / "run" / "results.h5"
    rec = Recorder(path, _Solo(), {"algorithm": {"name": "cdsgd"}})
    rec.log("train", 10, loss=1.0)
    rec.event("resize", 10, **{"from": 4, "to": 2, "what": "every agent starts from the average"})
    rec.log("train", 20, loss=0.5)
    rec.event("resize", 20, **{"from": 2, "to": 3})
    rec.close()
    res = load_results(path)
    assert [(e["kind"], e["step"], e["to"]) for e in json.loads(res["attrs"]["events"])] == \
        [("resize", 10, 2), ("resize", 20, 3)]
    table = summary_table([res])
    assert "events:" in table and "run: resized at step 10: 4 -> 2 ranks (every agent starts from the average)" in table
    Recorder(path, _Solo(), resume=15).close()
    assert [e["step"] for e in json.loads(load_results(path)["attrs"]["events"])] == [10]
    Recorder(path, _Solo(), resume=10).close()    # resumed again from 10: its own events, if any
    assert json.loads(load_results(path)["attrs"]["events"]) == []
