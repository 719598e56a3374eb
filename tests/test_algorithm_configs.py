"""The [algorithm] sections of LSGD, EASGD, pdADMM (-Q) and FDG: defaults are the documented
ones, and every check accepts its bound and rejects the nearest value past it.

Expected defaults are read from the option tables in docs/algorithms/*.md, not from the
dataclasses.  Keys shared with every SGD-type algorithm (lr, lr_schedule, ...) are checked
in test_config.py.
"""
import dataclasses

import pytest

from doctables import doc_defaults
from mpidl import config as C
from mpidl.algorithms.fdg import FDGConfig
from mpidl.algorithms.lsgd import EASGDConfig, LSGDConfig
from mpidl.algorithms.pdadmm import PdADMMConfig, PdADMMQConfig

LR_KEYS = {f.name for f in dataclasses.fields(C.LRConfig)}
LSGD_TABLE = ("algorithms/lsgd.md", "`[algorithm]` of `lsgd`")
EASGD_TABLE = ("algorithms/lsgd.md", "`[algorithm]` of `easgd`")
PDADMM_TABLE = ("algorithms/pdadmm.md", "## Options (`[algorithm]`)")
FDG_TABLE = ("algorithms/decoupled.md", '## Configuration (`[algorithm]`, `name = "fdg"`)')
# EASGD's table lists beta and tau; its other keys are documented "as above" (LSGD's rows)
EASGD_SHARED = ("momentum", "weight_decay", "asynchronous", "deterministic", "round_steps", "slow_rank",
                "slow_factor")


def _documented(cls):
    if cls is LSGDConfig:
        return doc_defaults(*LSGD_TABLE)
    if cls is EASGDConfig:
        lsgd = doc_defaults(*LSGD_TABLE)
        return {**{k: lsgd[k] for k in EASGD_SHARED}, **doc_defaults(*EASGD_TABLE)}
    if cls in (PdADMMConfig, PdADMMQConfig):
        return doc_defaults(*PDADMM_TABLE)
    return doc_defaults(*FDG_TABLE)


@pytest.mark.parametrize("cls,name", [(LSGDConfig, "lsgd"), (EASGDConfig, "easgd"),
                                      (PdADMMConfig, "pdadmm"), (PdADMMQConfig, "pdadmm-q"),
                                      (FDGConfig, "fdg")])
def test_defaults_are_the_documented_ones(cls, name):
    want = _documented(cls)
    if cls is PdADMMQConfig:
        want["quantize"] = True                         # "false (true for pdadmm-q)"
    got = cls()
    keys = {f.name for f in dataclasses.fields(cls)} - LR_KEYS - {"name"}
    assert keys == set(want) - LR_KEYS, sorted(keys ^ (set(want) - LR_KEYS))
    for k in sorted(keys):
        v = getattr(got, k)
        doc = tuple(want[k]) if isinstance(want[k], list) else want[k]
        assert v == doc and type(v) in (type(doc), float), (k, v, doc)
    assert got.name == name
    got.validate()                                      # the defaults are valid
    # the registry serves these classes under these names, defaults included
    assert C.load(None, [f"algorithm.name={name}"]).algorithm == got


def _bounds(cls, key, ok, bad, match, **extra):
    """(cls, fields, None) for each accepted value, (cls, fields, match) for each rejected one."""
    return ([(cls, {key: v, **extra}, None) for v in ok]
            + [(cls, {key: v, **extra}, match) for v in bad])


EPS = 1e-9
CASES = []
for cls in (LSGDConfig, EASGDConfig):                   # _check_common
    CASES += _bounds(cls, "momentum", [0.0, 1 - EPS], [-EPS, 1.0], r"momentum must lie in \[0, 1\), got")
    CASES += _bounds(cls, "round_steps", [1], [0], r"round_steps must be >= 1, got 0")
    CASES += _bounds(cls, "slow_factor", [1.0], [1 - EPS], r"slow_factor must be >= 1, got")
    CASES += _bounds(cls, "lr", [EPS], [0.0], r"lr")
    CASES += _bounds(cls, "deterministic", [False], [True], r"deterministic = true applies to asynchronous = true only")
    CASES += _bounds(cls, "deterministic", [True, False], [], None, asynchronous=True)
for key in ("lam", "lam_G"):
    CASES += _bounds(LSGDConfig, key, [0.0, 1 - EPS], [-EPS, 1.0, -1.0], rf"{key} must lie in \[0, 1\), got")
for key in ("p1", "p2"):                                # -1 means "= lam" / "= lam_G"
    CASES += _bounds(LSGDConfig, key, [-1.0, 0.0, 1 - EPS], [-EPS, 1.0, -1 - EPS, -1 + EPS],
                     rf"{key} must lie in \[0, 1\), got")
for key in ("tau", "tau_G", "window"):
    CASES += _bounds(LSGDConfig, key, [1], [0], rf"{key} must be >= 1, got 0")
CASES += _bounds(LSGDConfig, "groups", ["all", "size", "node"], ["world", ""], r"groups must be all, size or node",
                 group_size=1)
CASES += _bounds(LSGDConfig, "group_size", [1, 5], [0], r'groups = "size" needs group_size >= 1', groups="size")
CASES += _bounds(LSGDConfig, "group_size", [], [-1], r"group_size must be >= 0, got -1", groups="size")
CASES += _bounds(LSGDConfig, "group_size", [0], [], None, groups="all")
CASES += _bounds(LSGDConfig, "group_size", [0], [], None, groups="node")
CASES += _bounds(EASGDConfig, "beta", [EPS, 1.0], [0.0, 1 + EPS, -0.5], r"beta must lie in \(0, 1\], got")
CASES += _bounds(EASGDConfig, "tau", [1], [0], r"tau must be >= 1, got 0")

for key in ("rho", "nu", "tau0", "fista_step", "rho_factor", "rho_max", "init_std"):
    CASES += _bounds(PdADMMConfig, key, [EPS], [0.0, -EPS], rf"{key} must be > 0, got")
for key in ("mu", "fista_tol", "rho_tol"):
    CASES += _bounds(PdADMMConfig, key, [0.0], [-EPS], rf"{key} must be >= 0, got")
CASES += _bounds(PdADMMConfig, "fista_step", [2.0], [2 + EPS], r"fista_step must be <= 2 .*got")
for key in ("max_doublings", "fista_iters"):
    CASES += _bounds(PdADMMConfig, key, [0], [-1], rf"{key} must be >= 0, got -1")
for key in ("threads_per_rank", "downsample"):
    CASES += _bounds(PdADMMConfig, key, [1], [0], rf"{key} must be >= 1, got 0")
CASES += _bounds(PdADMMConfig, "init", ["torch", "normal"], ["xavier"], r"init must be torch or normal, got 'xavier'")
CASES += _bounds(PdADMMConfig, "quantize_p", [False], [True], r"quantize_p needs quantize = true")
CASES += _bounds(PdADMMConfig, "quantize_p", [False, True], [], None, quantize=True)
CASES += _bounds(PdADMMConfig, "grid_points", [2], [1], r"quantization grid \(grid_lo, grid_hi, grid_points\) cannot hold the values: .*n", quantize=True)
CASES += _bounds(PdADMMConfig, "grid_hi", [EPS * 1e6], [0.0, -0.5], r"grid_lo <= 0 < grid_hi|cannot hold",
                 quantize=True, grid_lo=-1.0)
CASES += _bounds(PdADMMConfig, "grid_lo", [0.0, -3.0], [1e-3], r"it needs grid_lo <= 0 < grid_hi",
                 quantize=True, grid_hi=2.0)
CASES += _bounds(PdADMMConfig, "grid_points", [2], [1], r"grid_points")   # checked without quantize too
CASES += _bounds(PdADMMQConfig, "grid_lo", [0.0], [0.5], r"it needs grid_lo <= 0 < grid_hi")

CASES += _bounds(FDGConfig, "beta", [EPS, 1.0], [0.0, 1 + EPS], r"beta must lie in \(0, 1\], got")
CASES += _bounds(FDGConfig, "stages", [1], [0], r"stages must be >= 1, got 0")
CASES += _bounds(FDGConfig, "replicas", [0, 3], [-1], r"replicas must be >= 0 \(0 = world size / stages\), got -1")
CASES += _bounds(FDGConfig, "momentum", [0.0, 1 - EPS], [-EPS, 1.0], r"momentum must lie in \[0, 1\), got")
CASES += _bounds(FDGConfig, "lr", [EPS], [0.0], r"lr")


@pytest.mark.parametrize("cls,fields,match", CASES,
                         ids=[f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in f.items())}-{'bad' if m else 'ok'}"
                              for c, f, m in CASES])
def test_each_check_at_its_bound(cls, fields, match):
    cfg = cls(**fields)
    if match is None:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match=match):
            cfg.validate()


def test_a_bad_value_is_a_config_error_through_load():
    """The checks run when a config is loaded: one ConfigError naming the value."""
    for name, key, val, match in [("lsgd", "tau_G", 0, "tau_G must be >= 1"),
                                  ("easgd", "beta", 2, r"beta must lie in \(0, 1\]"),
                                  ("pdadmm", "rho", 0, "rho must be > 0"),
                                  ("fdg", "stages", 0, "stages must be >= 1")]:
        with pytest.raises(C.ConfigError, match=match):
            C.load(None, [f"algorithm.name={name}", f"algorithm.{key}={val}"])


@pytest.mark.parametrize("cls", [LSGDConfig, EASGDConfig, PdADMMConfig, PdADMMQConfig, FDGConfig])
def test_sections_are_frozen(cls):
    cfg = cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"
