"""NEXT's configuration: the defaults are the documented ones, and every check holds at its boundary."""
import dataclasses
import re
from pathlib import Path

import pytest

from mpidl import config as C
from mpidl.algorithms.next import NEXTConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "algorithms" / "next.md"


def _documented_defaults():
    """The `key` | default rows of the table in docs/algorithms/next.md, parsed as Python literals."""
    text = DOC.read_text()
    table = text[text.index("## Configuration"):].split("\n\n")[1]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, flags=re.M)
    out = {}
    for key, val in rows:
        val = val.strip()
        out[key] = val.strip('"') if val.startswith('"') else (float(val) if re.search(r"[.e]", val) else int(val))
    return out


def test_defaults_are_the_documented_ones():
    doc = _documented_defaults()
    cfg = NEXTConfig()
    assert set(doc) == {f for f in cfg.__dataclass_fields__ if f != "name"}
    for key, want in doc.items():
        got = getattr(cfg, key)
        assert type(got) is type(want) and got == want, (key, got, want)
    assert cfg.name == "next" and C.load(None, ["algorithm.name=next"]).algorithm == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):      # a run's settings cannot drift
        cfg.tau = 2.0


@pytest.mark.parametrize("key,ok,bad", [
    ("tau", [1e-12, 3.0], [0.0, -1.0]),
    ("alpha0", [1e-9, 1.0], [0.0, 1.0 + 1e-9, -0.5]),
    ("eps", [0.0, 1 - 1e-9], [1.0, -1e-9]),
    ("lam", [0.0, 2.0], [-1e-12]),
    ("inner_iters", [0, 3], [-1]),
    ("threads_per_agent", [1, 2], [0]),
    ("blocks", [0, 1], [-1]),
])
def test_numeric_checks_at_their_boundaries(key, ok, bad):
    for v in ok:
        assert getattr(C.load(None, ["algorithm.name=next", f"algorithm.{key}={v}"]).algorithm, key) == v
    for v in bad:
        with pytest.raises(C.ConfigError, match=key):
            C.load(None, ["algorithm.name=next", f"algorithm.{key}={v}"])


@pytest.mark.parametrize("key,ok,bad", [
    ("reg", ["l1", "l2", "none"], ["L1", "l3"]),
    ("surrogate", ["linear", "gauss-newton"], ["gauss_newton", "newton"]),
])
def test_choices(key, ok, bad):
    for v in ok:
        over = ["model.loss=squared"] if v == "gauss-newton" else []
        assert getattr(C.load(None, ["algorithm.name=next", f"algorithm.{key}={v}"] + over).algorithm, key) == v
    for v in bad:
        with pytest.raises(C.ConfigError, match=f"{key} must be"):
            C.load(None, ["algorithm.name=next", f"algorithm.{key}={v}"])
