"""The public Python API without MPI: mpidl.Config (from_toml, from_dict, replace, to_toml) and
``import mpidl`` staying free of torch and mpi4py until a collective name is used."""
import subprocess
import sys
import tomllib

import pytest

import mpidl
from mpidl.config import ConfigError


def test_config_from_dict_and_toml_round_trip(tmp_path):
    cfg = mpidl.Config.from_dict({"algorithm": {"name": "cdmsgd", "lr": 0.05, "momentum_form": "heavy-ball"},
                                  "model": {"hidden": [32, 16], "dropout": 0.25},
                                  "run": {"epochs": 2, "name": 'odd "name" \\ é'},
                                  "topology": {"name": "torus", "shape": [2, 2]}})
    text = cfg.to_toml()
    assert mpidl.Config.from_dict(tomllib.loads(text)) == cfg
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert mpidl.Config.from_toml(path) == cfg
    assert mpidl.Config.from_toml(path).model.hidden == (32, 16)
    for algo in ("cdsgd", "fedavg", "lsgd", "easgd", "next", "centralized"):
        c = mpidl.Config.from_dict({"algorithm": {"name": algo}})
        assert mpidl.Config.from_dict(tomllib.loads(c.to_toml())) == c, algo


def test_config_replace_by_section_and_by_dotted_key():
    cfg = mpidl.Config.from_dict({"algorithm": {"name": "cdmsgd", "lr": 0.05}})
    a = cfg.replace(run={"epochs": 3}, algorithm={"lr": 0.1})
    assert (a.run.epochs, a.algorithm.lr, a.algorithm.momentum) == (3.0, 0.1, cfg.algorithm.momentum)
    assert cfg.run.epochs == 1.0 and cfg.algorithm.lr == 0.05          # unchanged
    b = cfg.replace({"run.epochs": 4, "model.hidden": (8,)}, data={"partition": "by-class"})
    assert (b.run.epochs, b.model.hidden, b.data.partition) == (4.0, (8,), "by-class")
    c = cfg.replace(algorithm={"name": "fedavg", "local_steps": 3})   # a new algorithm starts from its defaults
    assert c.algorithm.name == "fedavg" and c.algorithm.local_steps == 3 and c.algorithm.lr == 0.01


@pytest.mark.parametrize("call,match", [
    (lambda c: c.replace(algorithm={"lrate": 1}), "lrate"),
    (lambda c: c.replace({"run": 2}), "section.key"),
    (lambda c: c.replace(runs={"epochs": 2}), "unknown section"),
    (lambda c: c.replace(run=2), "dict"),
    (lambda c: c.replace(run={"epochs": "two"}), "number"),
    (lambda c: c.replace(run={"epochs": 0}), "epochs"),
    (lambda c: mpidl.Config.from_dict([1]), "dict"),
    (lambda c: mpidl.Config.from_toml("/nonexistent.toml"), "not found"),
])
def test_config_errors_name_the_key(call, match):
    with pytest.raises(ConfigError, match=match):
        call(mpidl.Config.from_dict({}))


def test_train_rejects_a_non_config():
    with pytest.raises(TypeError, match="mpidl.Config"):
        mpidl.train({"run": {}})


def test_import_mpidl_and_public_names_stay_light():
    code = ("import sys, mpidl\n"
            "mpidl.Config, mpidl.train, mpidl.fit, mpidl.FitResult\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'mpi4py')]\n"
            "assert not bad, bad\n"
            "assert callable(mpidl.optim.Consensus) and 'torch' in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("algorithm,topology,options,expect", [
    ("cdsgd", "complete", {"form": "atc", "comm_period": 3},
     {"algorithm.form": "atc", "algorithm.comm_period": 3, "topology.name": "complete"}),
    ("cdmsgd", "torus", {"momentum_form": "heavy-ball", "schedule": "one_peer_exponential"},
     {"algorithm.momentum_form": "heavy-ball", "topology.name": "torus", "topology.schedule": "one_peer_exponential"}),
    ("fedavg", "ring", {"local_steps": 3}, {"algorithm.local_steps": 3}),
    ("lsgd", "ring", {"tau_G": 5, "tau": 2, "groups": "size", "group_size": 2},
     {"algorithm.tau_G": 5, "algorithm.tau": 2, "algorithm.groups": "size", "algorithm.group_size": 2}),
])
def test_fit_keywords_with_non_default_values_reach_the_config(algorithm, topology, options, expect):
    """mpidl.fit's periods, forms, partition and topology keywords land in the Config that runs (a
    dropped keyword would run the default silently); the defaults differ from every value used here."""
    import numpy as np

    from mpidl.api import _build_config
    from mpidl.config import Config
    from mpidl.sources import unregister_arrays
    x, y = np.zeros((8, 3), np.float32), np.arange(8) % 2
    cfg, path = _build_config("mlp", (x, y), None, algorithm, topology, 1.0, 4, None, None, "by-class", 0,
                              dict(options))
    try:
        default = Config.from_dict({"algorithm": {"name": algorithm}})
        for key, want in dict(expect, **{"data.partition": "by-class"}).items():
            sec, name = key.split(".")
            got = getattr(getattr(cfg, sec), name)
            assert got == want and getattr(getattr(default, sec), name) != want, (key, got)
    finally:
        unregister_arrays(path)
