"""Config: TOML + --set overrides into frozen dataclasses; unknown keys are errors."""
import dataclasses

import pytest

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
