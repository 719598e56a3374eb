"""Every config key is validated: an out-of-range value is one clear error naming the key.

``BAD`` maps ``section.key`` to out-of-range values (TOML text; ``{tmp}`` is a scratch folder
holding a regular file ``afile``).  The keys are enumerated from the dataclasses (and from every
registered algorithm's config class), so a new key without a ``BAD`` entry fails
:func:`test_every_key_has_bad_values`: add its bad values here when you add the key.

In process, every bad value goes through the loader three ways (a TOML file, ``--set`` and the
plain dict that Python keyword entry points build) and must raise one :class:`ConfigError` whose
one-line message starts with ``[section]`` and names the key.  A handful of cases run the CLI:
``python -m mpidl run cfg.toml`` at 1 rank and under ``mpiexec -n 2``, expecting exit status 2,
one ``error:`` line from rank 0, no traceback and nothing created under ``run.out``.
"""
import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mpidl import config as C

ROOT = Path(__file__).resolve().parent.parent

# section.key -> bad values (TOML text).  Algorithm keys are shared by name: every algorithm that
# has the key must reject every value listed.
BAD = {
    # [comm]
    "comm.cuda_aware": ['"yes"', "1", '""'],
    "comm.progress": ['"always"', '""', "1"],
    "comm.bucket_mb": ["-1", "nan", "inf", '"big"'],
    # [data]
    "data.dataset": ['"nope"', '""'],
    "data.data_dir": ['"{tmp}/missing"', '"{tmp}/afile"'],
    "data.shards": ['"{tmp}/missing.h5"', '"{tmp}"'],
    "data.path": ['"{tmp}/missing.npz"', '"{tmp}"'],
    "data.augment": ["1", '"yes"'],
    "data.partition": ['"random"'],
    "data.alpha": ["0", "-1", "nan", "inf"],
    "data.seed": ["-1", "1.5"],
    "data.eval_samples": ["-1"],
    "data.prefetch": ["-1", "1.5", "true"],
    "data.shuffle": ['"chunk"', '""'],
    "data.shuffle_buffer": ["0", "-2"],
    "data.check": ['"yes"', '""', "true"],
    # [model]
    "model.name": ['"nope"', '"MLP"'],
    "model.hidden": ["[-5]", "[0]", "[16, 0]", "[1.5]", "[true]", "3"],
    "model.loss": ['"hinge"'],
    "model.dtype": ['"float16"'],
    "model.dropout": ["1", "-0.1", "nan"],
    "model.factory": ['"no_colon"', "3"],
    "model.kwargs": ['[["a", 1]]'],
    # [topology]
    "topology.name": ['"nope"'],
    "topology.weights": ['"nope"'],
    "topology.p": ["0", "1.5", "nan"],
    "topology.seed": ["-1"],
    "topology.shape": ["[0, 2]", "[2, -1]", '["a"]'],
    "topology.schedule": ['"nope"'],
    # [run]
    "run.name": ['"a/b"', '".."', '"."'],
    "run.epochs": ["-1", "nan", "inf"],
    "run.steps": ["-1", "1.5"],
    "run.batch_size": ["-1"],
    "run.seed": ["-1"],
    "run.log_every": ["0", "-3"],
    "run.eval_every": ["-1"],
    "run.checkpoint_every": ["-1"],
    "run.keep": ["-1"],
    "run.out": ['""', '"{tmp}/afile/sub"', '"{tmp}/afile"'],
    "run.resume": ['"sometimes"', '"-3"', '""'],
    "run.resize": ['"yes"', '"leader"', '""'],
    "run.threads": ["-1", "1.5"],
    "run.device": ['"gpu"', '""'],
    # [algorithm], every family
    "algorithm.name": ['"nope"'],
    "algorithm.lr": ["0", "-1", "nan"],
    "algorithm.lr_schedule": ['"cosine"'],
    "algorithm.decay": ["-1", "inf"],
    "algorithm.power": ["-1"],
    "algorithm.step_epochs": ["0", "-2"],
    "algorithm.weight_decay": ["-1"],
    "algorithm.momentum": ["-0.1", "1"],
    "algorithm.nesterov": ["1"],
    # cdsgd / cdmsgd / fedavg
    "algorithm.comm_period": ["0"],
    "algorithm.form": ['"x"'],
    "algorithm.momentum_form": ['"x"'],
    "algorithm.local_steps": ["-1"],
    "algorithm.local_epochs": ["-1"],
    # lsgd / easgd
    "algorithm.groups": ['"x"'],
    "algorithm.group_size": ["-1"],
    "algorithm.lam": ["-1"],
    "algorithm.lam_G": ["1", "-1"],
    "algorithm.tau": ["-1", "0"],
    "algorithm.tau_G": ["0"],
    "algorithm.window": ["0"],
    "algorithm.step_pull": ["1"],
    "algorithm.p1": ["1.5", "-0.5"],
    "algorithm.p2": ["1.5", "-0.5"],
    "algorithm.asynchronous": ['"yes"'],
    "algorithm.deterministic": ["1", "true"],          # true needs asynchronous = true
    "algorithm.round_steps": ["0"],
    "algorithm.slow_rank": ["-2"],
    "algorithm.slow_factor": ["0.5"],
    "algorithm.beta": ["0", "1.5"],
    # next
    "algorithm.alpha0": ["0", "1.5"],
    "algorithm.eps": ["1", "-0.1"],
    "algorithm.reg": ['"l3"'],
    "algorithm.surrogate": ['"newton"'],
    "algorithm.inner_iters": ["-1"],
    "algorithm.inner_tol": ["-1"],
    "algorithm.threads_per_agent": ["0"],
    "algorithm.blocks": ["-1"],
    # fdg
    "algorithm.stages": ["0"],
    "algorithm.replicas": ["-1"],
    "algorithm.cuts": ["[0]", "[2, 1, 3]", "[1.5]"],
    # pdadmm / pdadmm-q
    "algorithm.rho": ["0"],
    "algorithm.nu": ["0"],
    "algorithm.mu": ["-1"],
    "algorithm.tau0": ["0"],
    "algorithm.max_doublings": ["-1"],
    "algorithm.fista_iters": ["-1"],
    "algorithm.fista_tol": ["-1"],
    "algorithm.fista_step": ["3", "0"],
    "algorithm.quantize": ["1"],
    "algorithm.quantize_p": ["1"],
    "algorithm.grid_lo": ["5"],
    "algorithm.grid_hi": ["-2"],
    "algorithm.grid_points": ["1"],
    "algorithm.rho_raise": ["1"],
    "algorithm.rho_factor": ["0"],
    "algorithm.rho_max": ["0"],
    "algorithm.rho_tol": ["-1"],
    "algorithm.init": ['"xavier"'],
    "algorithm.init_std": ["0"],
    "algorithm.downsample": ["0"],
    "algorithm.threads_per_rank": ["0"],
    "algorithm.wait_poll_us": ["-1"],
}


def _keys():
    """(section, key, algorithm name or None) for every key of every section and algorithm."""
    out = [(sec, f.name, None) for sec, cls in C._SECTIONS.items() for f in dataclasses.fields(cls)]
    from mpidl.algorithms import MODULES    # the built-in families (a test may register toys)
    reg = C.algorithm_registry()
    for name in sorted(MODULES):
        out += [("algorithm", f.name, name) for f in dataclasses.fields(reg[name][0])]
    return out


KEYS = _keys()
CASES = [(sec, key, algo, bad) for sec, key, algo in KEYS for bad in BAD.get(f"{sec}.{key}", [])
         if not (key == "name" and sec == "algorithm" and algo != "cdsgd")]


def test_every_key_has_bad_values():
    missing = sorted({f"{sec}.{key}" for sec, key, _ in KEYS} - set(BAD))
    assert not missing, f"add out-of-range values for {missing} to BAD in {__file__}"
    stale = sorted(set(BAD) - {f"{sec}.{key}" for sec, key, _ in KEYS})
    assert not stale, f"BAD lists keys no config has: {stale}"


@pytest.fixture
def scratch(tmp_path):
    (tmp_path / "afile").write_text("a regular file, not a folder\n")
    return tmp_path


def _check_message(msg, section, key):
    assert "\n" not in msg, msg
    assert msg.startswith(f"[{section}] "), msg
    assert re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", msg), (key, msg)


def _outs(tmp):
    return [f'run.out="{tmp}/out"']


@pytest.mark.parametrize("section,key,algo,bad", CASES,
                         ids=[f"{a or s}.{k}={b}" for s, k, a, b in CASES])
def test_bad_value_is_one_error_naming_the_key(section, key, algo, bad, scratch):
    text = bad.replace("{tmp}", str(scratch))
    pre = [f'algorithm.name="{algo}"'] if algo and key != "name" else []
    out = [] if (section, key) == ("run", "out") else _outs(scratch)
    # --set
    with pytest.raises(C.ConfigError) as e:
        C.load(None, pre + out + [f"{section}.{key}={text}"])
    _check_message(str(e.value), section, key)
    # a TOML file
    d = {}
    for item in pre + out + [f"{section}.{key}={text}"]:
        k, v = item.split("=", 1)
        s, kk = k.split(".")
        d.setdefault(s, []).append(f"{kk} = {v}")
    p = scratch / "cfg.toml"
    p.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in d.items()))
    with pytest.raises(C.ConfigError) as e:
        C.load(p)
    _check_message(str(e.value), section, key)
    # Python keywords: the plain dict an API entry point builds, then the same path checks
    plain = tomllib.loads(p.read_text())
    with pytest.raises(C.ConfigError) as e:
        C.check_paths(C.from_dict(plain))
    _check_message(str(e.value), section, key)
    assert not (scratch / "out").exists()


def test_good_values_next_to_the_bad_ones_load(scratch):
    """The edges the checks must let through."""
    cfg = C.load(None, ["run.log_every=1", "run.keep=0", "run.resume=12", "data.eval_samples=0",
                        "model.hidden=[]", "topology.p=1", "run.epochs=0", "run.steps=1",
                        f'run.out="{scratch}/new/deeper"', "data.seed=0", "run.threads=1"])
    assert cfg.run.resume == "12" and cfg.model.hidden == () and not (scratch / "new").exists()
    C.load(None, ["algorithm.name=pdadmm-q", "algorithm.quantize_p=true"])
    C.load(None, ["algorithm.name=lsgd", "algorithm.p1=-1", "algorithm.slow_rank=-1"])
    C.load(None, ["algorithm.name=fdg", "algorithm.stages=3", "algorithm.cuts=[2, 5]"])


# -- through the CLI -------------------------------------------------------------------------------
def _cli(tmp_path, toml, n=1, timeout=240):
    """Run ``python -m mpidl run cfg.toml`` (n = 1: plain; n > 1: under mpiexec, one file per rank)."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(toml)
    env = dict(os.environ, OMP_NUM_THREADS="1", D=str(tmp_path))
    if n == 1:
        p = subprocess.run([sys.executable, "-m", "mpidl", "run", str(cfg)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
        return {0: p.returncode}, {0: p.stderr}, {0: p.stdout}
    from test_cli import PER_RANK
    from test_mpi_suite import mpiexec
    p = subprocess.run([*mpiexec(), "-n", str(n), "sh", "-c", PER_RANK, sys.executable, "run", str(cfg)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    rd = {r: tmp_path / f"rc.{r}" for r in range(n)}
    rcs = {r: int(rd[r].read_text()) for r in range(n) if rd[r].exists()}
    return (rcs, {r: (tmp_path / f"err.{r}").read_text() for r in range(n)},
            {r: (tmp_path / f"out.{r}").read_text() for r in range(n)})


BASE = '[data]\ndataset = "digits"\n[model]\nhidden = [8]\n[run]\nsteps = 2\nbatch_size = 16\nout = "{out}"\n'

CLI_CASES = [
    ("hidden", '[model]\nhidden = [-5]\n'),
    ("log_every", '[run]\nlog_every = 0\n'),
    ("eval_samples", '[data]\neval_samples = -1\n'),
    ("out", '[run]\nout = "{tmp}/afile/sub"\n'),
    ("convex-lsq", '[model]\nname = "convex-lsq"\n[algorithm]\nname = "next"\n'),        # at setup
    ("convex-logistic", '[model]\nname = "convex-logistic"\n[algorithm]\nname = "next"\n'),
]


def _merge(base, extra):
    """The base TOML with ``extra``'s keys put into their sections (later keys win)."""
    d = tomllib.loads(base)
    for s, kv in tomllib.loads(extra).items():
        d.setdefault(s, {}).update(kv)

    def val(v):
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return str(v).lower() if isinstance(v, bool) else str(v)
    return "".join(f"[{s}]\n" + "".join(f"{k} = {val(v)}\n" for k, v in kv.items()) for s, kv in d.items())


def _expect_one_error(rcs, err, out, n, name, outdir):
    assert rcs == {r: 2 for r in range(n)}, (rcs, err)
    lines = [ln for ln in err[0].splitlines() if ln.strip()]
    assert len(lines) == 1 and "mpidl run: error: [" in lines[0] and name in lines[0], err[0][-3000:]
    assert all(not err[r].strip() for r in range(1, n)), err
    assert not any("Traceback" in err[r] + out[r] for r in range(n))
    assert not outdir.exists() or not any(outdir.iterdir()), sorted(outdir.rglob("*"))


@pytest.mark.parametrize("name,extra", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_key_exit_2_one_line(name, extra, scratch):
    outdir = scratch / "out"
    toml = _merge(BASE.replace("{out}", str(outdir)), extra.replace("{tmp}", str(scratch)))
    rcs, err, out = _cli(scratch, toml)
    _expect_one_error(rcs, err, out, 1, name, outdir)


def test_cli_bad_key_two_ranks(scratch):
    """Under mpiexec -n 2: exit 2 on both ranks, one line from rank 0, none from rank 1, no hang."""
    pytest.importorskip("mpi4py")
    name, extra = CLI_CASES[5]         # checked at setup, collectively: the data decide
    outdir = scratch / "out"
    toml = _merge(BASE.replace("{out}", str(outdir)), extra.replace("{tmp}", str(scratch)))
    rcs, err, out = _cli(scratch, toml, n=2)
    _expect_one_error(rcs, err, out, 2, name, outdir)
