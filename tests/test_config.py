"""Config: TOML + --set overrides into frozen dataclasses; unknown keys are errors."""
import dataclasses

import pytest

from doctables import doc_defaults
from mpidl import config as C


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[algorithm]\nname = "cdmsgd"\nlr = 0.05\n[topology]\nname = "complete"\n[model]\nhidden = [64]\n')
    cfg = C.load(p, ["algorithm.momentum=0.5", "run.name=1e3", "run.resume=auto", "model.hidden=[8, 4]"])
    assert cfg.algorithm.name == "cdmsgd" and cfg.algorithm.lr == 0.05 and cfg.algorithm.momentum == 0.5
    assert cfg.topology.name == "complete" and cfg.model.hidden == (8, 4)
    assert cfg.run.name == "1e3" and cfg.run.resume == "auto"   # string fields keep the raw text
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.epochs = 3
    assert C.from_dict(C.to_dict(cfg)) == cfg                    # round trip through the saved form


@pytest.mark.parametrize("overrides,match", [
    (["algorithm.lrate=0.1"], "unknown key"),
    (["dat.x=1"], "unknown section"),
    (["algorithm.name=sgdx"], "unknown algorithm"),
    (["algorithm.lr=-1"], "lr must be > 0"),
    (["run.epochs=abc"], "must be a number"),
    (["algorithm.name=cdmsgd", "algorithm.momentum=1.5"], "momentum"),
    (["algorithm.name=next", "algorithm.alpha0=2"], "alpha0"),
    (["run.batch_size=-1"], "batch_size"),
    (["model.loss=hinge"], "loss"),
    (["nokey"], "section.key=value"),
])
def test_bad_input_is_a_clear_error(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load(None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nepochs = 1")
    with pytest.raises(C.ConfigError, match="invalid TOML"):
        C.load(bad)


def test_shipped_configs_load():
    from pathlib import Path
    configs = sorted((Path(__file__).parent.parent / "jobs" / "configs").glob("*.toml"))
    assert configs
    for p in configs:
        C.load(p)


# -- tests added by the third mutation run (docs/testing.md) ----------------------------------
@pytest.mark.parametrize("section", ["data", "model", "topology", "run"])
def test_defaults_are_the_documented_ones(section):
    want = doc_defaults("training.md", f"### `[{section}]`")
    got = C.to_dict(C.load(None))[section]
    assert set(want) == set(got)
    for k, v in want.items():
        assert got[k] == v and type(got[k]) is type(v), (section, k, got[k], v)


def test_lr_defaults_are_the_documented_ones():
    want = doc_defaults("algorithms/cdsgd.md", "`[algorithm]` keys")
    lr = C.LRConfig()
    for k in ("lr", "lr_schedule", "decay", "power", "step_epochs"):
        assert getattr(lr, k) == want[k] and type(getattr(lr, k)) is type(want[k]), k
    assert C.load(None).algorithm.name == want["name"]


@pytest.mark.parametrize("overrides,match", [
    (["run.batch_size=-1"], r"batch_size must be >= 0"),
    (["run.epochs=0"], r"set epochs > 0 or steps > 0"),
    (["run.epochs=-1", "run.steps=0"], r"\[run\] epochs must be >= 0, got -1.0"),
    (["model.dropout=1.0"], r"dropout must lie in \[0, 1\), got 1.0"),
    (["model.dropout=-0.1"], r"dropout must lie in \[0, 1\)"),
    (["model.dtype=float16"], r"dtype must be float32 or float64, got 'float16'"),
    (["run.steps=1.5"], r"\[run\] steps must be an integer, got 1.5"),
    (["run.steps=true"], r"steps must be an integer"),
    (["run.epochs=true"], r"\[run\] epochs must be a number"),
    (["model.hidden=3"], r"\[model\] hidden must be a list, got 3"),
    (["data.alpha=[1]"], r"alpha must be a number"),
    (["run.steps"], r"--set expects section.key=value"),
    (["run.steps.x=1"], r"--set key must be section.key, got 'run.steps.x'"),
    ([".steps=1"], r"--set key must be section.key"),
    (["run.=1"], r"--set key must be section.key"),
    (["data.nope=1", "data.zzz=2"], r"unknown key\(s\) nope, zzz in \[data\]; valid keys: dataset, data_dir"),
    (["dat.x=1", "abc.y=2"], r"unknown section\(s\) abc, dat; valid: data, model, topology, run, comm, algorithm"),
])
def test_more_bad_input(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load(None, overrides)


def test_boundary_values_are_accepted_and_coerced():
    cfg = C.load(None, ["run.batch_size=0", "run.epochs=0", "run.steps=3", "model.dropout=0.0",
                        "model.dtype=float64", "model.loss=squared", "run.epochs=2", "data.alpha=2",
                        "run.name=a=b", "topology.shape=[2, 3]", "run.resume=7"])
    assert cfg.run.batch_size == 0 and cfg.run.steps == 3 and cfg.model.dtype == "float64"
    assert cfg.run.epochs == 2.0 and type(cfg.run.epochs) is float      # the last --set wins
    assert cfg.data.alpha == 2.0 and type(cfg.data.alpha) is float     # ints are numbers
    assert cfg.run.name == "a=b" and cfg.topology.shape == (2, 3) and cfg.run.resume == "7"
    assert C.load(None, ["model.dropout=0.5"]).model.dropout == 0.5
    assert C.load(None, ["run.epochs=0.5", "run.steps=0"]).run.epochs == 0.5
    assert C.load(None, ["run.epochs=0", "run.steps=1"]).run.steps == 1     # steps alone suffice
    cfg = C.load(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = C.RunConfig()                                        # the Config itself is frozen
    assert C.load(None, ["algorithm.name=centralized", "algorithm.nesterov=true"]).algorithm.nesterov is True
    with pytest.raises(C.ConfigError, match="nesterov must be true or false, got 1"):
        C.load(None, ["algorithm.name=centralized", "algorithm.nesterov=1"])
    # the default run name; a given one wins
    assert C.load(None).run_name == "cdsgd_ring"
    assert C.load(None, ["run.name=x"]).run_name == "x"


def test_tables_files_and_saved_form(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("run = 5\n")
    with pytest.raises(C.ConfigError, match=r"--set run.steps: \[run\] is not a table"):
        C.load(p, ["run.steps=2"])
    with pytest.raises(C.ConfigError, match=r"\[run\] must be a table, got 5"):
        C.load(p)
    for bad in ("true", "[1]", "1.5"):                # from a file, a string key takes str or int only
        p.write_text(f"[run]\nname = {bad}\n")
        with pytest.raises(C.ConfigError, match=r"\[run\] name must be a string"):
            C.load(p)
    p.write_text("[run]\nname = 12\n")
    assert C.load(p).run.name == "12"
    p.write_text('[run]\nsteps = 4\n[model]\nhidden = [3]\n')
    cfg = C.load(p, ["run.seed=2"])
    d = C.to_dict(cfg)
    assert d["run"]["steps"] == 4 and d["run"]["seed"] == 2 and d["model"]["hidden"] == [3]
    assert list(d) == ["data", "model", "topology", "algorithm", "run", "comm"]
    import json
    assert json.loads(C.dumps(cfg)) == d and C.dumps(cfg).index('"algorithm"') < C.dumps(cfg).index('"data"')


def test_load_collective_same_config_or_same_error():
    class Comm:                          # one rank; bcast returns what rank 0 sent
        rank = 0
        sent = []

        def bcast(self, obj, root=0):
            assert root == 0                 # rank 0 reads the file and sends the result
            self.sent.append(obj)
            return obj
    comm = Comm()
    cfg = C.load_collective(comm, None, ["run.steps=5"])
    assert cfg == C.load(None, ["run.steps=5"]) and comm.sent[-1][0] == "ok"
    with pytest.raises(C.ConfigError, match="unknown section"):
        C.load_collective(comm, None, ["zz.a=1"])
    assert comm.sent[-1][0] == "error"

    class Other(Comm):                   # a rank > 0 gets rank 0's payload and reads nothing itself
        def Get_rank(self):
            return 1

        def bcast(self, obj, root=0):
            assert obj is None
            return ("error", "from rank 0")
    with pytest.raises(C.ConfigError, match="from rank 0"):
        C.load_collective(Other(), None, ["zz.a=1"])


def test_register_algorithm_and_layout():
    assert C.algorithm_layout("cdsgd") is None
    assert C.algorithm_layout("pdadmm") is not None and C.algorithm_layout("fdg") is not None
    reg = C.algorithm_registry()
    assert {"cdsgd", "cdmsgd", "centralized", "fedavg", "next", "lsgd", "easgd", "fdg", "pdadmm"} <= set(reg)


def test_every_section_is_frozen():
    """A run's settings cannot drift after loading: every section rejects assignment."""
    cfg = C.load(None, ["algorithm.name=cdsgd"])
    for section in ("data", "model", "topology", "run", "algorithm"):
        obj = getattr(cfg, section)
        name = dataclasses.fields(obj)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, getattr(obj, name))
