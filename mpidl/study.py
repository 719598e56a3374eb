"""``mpidl compare``: several methods on one problem, one budget, several seeds, one report.

A study (a TOML file, or the same plain dict from Python) names the shared
problem once and the methods to compare::

    seeds = [0, 1, 2]
    wall_seconds = 20           # ONE budget: epochs, wall_seconds or bytes
    out = "studies/mine"        # default: studies/<file stem>
    max_epochs = 1000           # wall/bytes budgets: cap on the length of a run

    [data]  ...                 # as in a run config (no seed: the study's seeds set it)
    [model] ...
    [topology] ...
    [run]   ...                 # no name/out/resume/seed/epochs/steps: the study sets them

    [[method]]
    name = "cdmsgd"             # the label and folder name (default: the algorithm)
    algorithm = "cdmsgd"        # every other key is the algorithm's own
    lr = 0.01
    [method.topology]           # optional overrides of [topology], [model] and [run]
    name = "ring"

Each (method, seed) is one ordinary validated :class:`~mpidl.config.Config`
(built with :func:`mpidl.config.from_dict`, ``run.seed = data.seed = seed``)
run through the one driver :func:`mpidl.driver.train` with results under
``out/<method>/seed<seed>/``.  Given the seed, every method sees the same data
partition, the same initial weights (unless a method overrides the model) and
the same evaluation.  Budgets:

* ``epochs``: ``run.epochs = epochs``;
* ``wall_seconds``: the run stops at the first ``train`` row whose wall time
  (the results file's, continued across resumes) reaches the budget;
* ``bytes``: likewise on the bytes sent by all ranks together.

The wall and byte budgets use the driver's ``should_stop`` hook: rank 0
decides from the row it logged and one max-reduction makes every rank stop at
the same step, which the driver then evaluates and checkpoints.  A run
overshoots its budget by less than ``run.log_every`` steps.

Machine and load: each run's ``done.json`` records :func:`machine_facts` (ranks, nodes, ranks
per node, host, cores, ``MPIDL_LINK_RATE``) and the 1-minute load average rank 0 sampled during
the run (:class:`_LoadSampler`); the report shows both.

Resume: ``done.json`` in a run's folder is written (atomically) after its
results file is complete; such runs are not rerun.  Every other run starts
with ``run.resume = "auto"``, so a half-finished one continues from its newest
checkpoint.  ``config.json`` pins a run's config: rerunning a study whose
settings changed for a run that has already started is an error.

All validation happens on rank 0 before the first run starts, with the world
size known, and the one error (exit 2 from the CLI) reaches every rank.
The report is :mod:`mpidl.study_report`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import tomllib
from pathlib import Path

from mpidl import config as C
from mpidl.errors import MpidlError

__all__ = ["compare", "plan_study", "StudyError", "BUDGETS"]

log = logging.getLogger("mpidl.compare")

BUDGETS = ("epochs", "wall_seconds", "bytes")
_TOP_KEYS = ("seeds", "out", "max_epochs", "warmup", "title", "method", "data", "model", "topology", "run",
             "comm") + BUDGETS
_SET_BY_STUDY = {"run": ("name", "out", "resume", "seed", "epochs", "steps"), "data": ("seed",)}
_METHOD_TABLES = ("topology", "model", "run")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyError(MpidlError):
    """A study that cannot run (raised on every rank before any run starts)."""


# -- planning (Local, rank 0) ---------------------------------------------------------

def _read(study):
    if isinstance(study, dict):
        return dict(study), "study"
    p = Path(study)
    if not p.is_file():
        raise StudyError(f"study file {str(p)!r} not found")
    try:
        return tomllib.loads(p.read_text()), p.stem
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{p}: invalid TOML: {e}") from None


def _table(d, key, where):
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise StudyError(f"{where}{key} must be a table, got {v!r}")
    return dict(v)


def _budget(d):
    given = [k for k in BUDGETS if k in d]
    if len(given) != 1:
        raise StudyError(f"a study needs exactly one budget ({', '.join(BUDGETS)}), got "
                         f"{', '.join(given) if given else 'none'}")
    kind = given[0]
    v = d[kind]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise StudyError(f"budget {kind} must be a number > 0, got {v!r}")
    return kind, float(v)


def _model_form(name, cfg, size):
    """Local. Raise StudyError when method ``name`` cannot train the model ``cfg`` gives it at ``size`` ranks."""
    from mpidl.layouts import CONVEX_MODELS, build_topology
    algo, m, why = cfg.algorithm.name, cfg.model, None
    layout = C.algorithm_layout(algo)
    family = getattr(layout, "__module__", "") if layout is not None else "agents"
    if family.endswith("pdadmm_layout"):
        if m.factory:
            why = f"{algo} builds its own layer MLP from model.hidden; a model factory ({m.factory}) does not apply"
        elif m.name != "mlp":
            why = f"{algo} trains a layer-parallel MLP (model.name = \"mlp\"), the study's model is {m.name!r}"
        elif m.loss != "ce":
            why = f"{algo} minimises cross-entropy (model.loss = \"ce\"), got {m.loss!r}"
        elif cfg.run.batch_size != 0:
            why = f"{algo} is full batch: set batch_size = 0 in [method.run]"
        elif len(m.hidden) + 1 < size:
            why = (f"{algo} puts at most one layer per rank: {size} ranks but the MLP {list(m.hidden)} has "
                   f"{len(m.hidden) + 1} layers; give the method more hidden layers in [method.model]")
    elif family.endswith("fdg_grid"):
        from mpidl.algorithms.fdg_grid import grid_shape
        if not m.factory and m.name not in ("mlp", "cnn", "resnet20", "linear"):
            why = (f"{algo} cuts a torch model into pipeline stages (mlp, cnn, resnet20, linear or a factory's "
                   f"nn.Sequential), not {m.name!r}")
        elif cfg.run.batch_size <= 0:
            why = f"{algo} needs minibatches: batch_size > 0"
        else:
            try:
                grid_shape(cfg.algorithm, size)
            except MpidlError as e:
                why = str(e)
    else:  # the agent layout: one rank = one agent; torch and convex models
        if algo == "next" and cfg.algorithm.surrogate == "gauss-newton" and m.loss != "squared" \
                and m.name not in CONVEX_MODELS:
            why = "NEXT's Gauss-Newton surrogate needs model.loss = \"squared\""
        else:
            try:
                build_topology(cfg.topology, size)
            except (MpidlError, ValueError) as e:
                why = f"topology: {e}"
    if why:
        raise StudyError(f"method {name!r}: {why}")


def plan_study(study, size: int | None, out=None) -> dict:
    """Local. Validate a study for ``size`` ranks; return the plan (plain, picklable).

    ``study`` is a TOML path or the parsed dict.  Every (method, seed) config
    is built and validated here, so a bad study fails before any run starts.
    ``size = None`` skips the checks that depend on the world size (a report
    of runs made at another size).
    """
    d, stem = _read(study)
    unknown = sorted(set(d) - set(_TOP_KEYS))
    if unknown:
        raise StudyError(f"unknown key(s) {', '.join(unknown)} in the study; valid: {', '.join(_TOP_KEYS)}")
    kind, value = _budget(d)
    seeds = d.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise StudyError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds has duplicates: {seeds}")
    max_epochs = d.get("max_epochs", 1000)
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, float)) or max_epochs <= 0:
        raise StudyError(f"max_epochs must be a number > 0, got {max_epochs!r}")
    warmup = d.get("warmup", True)
    if not isinstance(warmup, bool):
        raise StudyError(f"warmup must be true or false, got {warmup!r}")
    out_dir = str(out or d.get("out") or os.path.join("studies", stem))
    shared = {sec: _table(d, sec, "") for sec in ("data", "model", "topology", "run", "comm")}
    for sec, keys in _SET_BY_STUDY.items():
        bad = [k for k in keys if k in shared[sec]]
        if bad:
            raise StudyError(f"[{sec}] {', '.join(bad)}: set by the study (seeds, budget, out), not in [{sec}]")
    methods = d.get("method", [])
    if not isinstance(methods, list) or not all(isinstance(m, dict) for m in methods):
        raise StudyError("method must be an array of tables: [[method]] ... ")
    if not methods:
        raise StudyError("the study lists no methods: add [[method]] tables (algorithm = \"...\")")
    registry = C.algorithm_registry()
    runs, names, info = [], [], []
    for i, m in enumerate(methods):
        m = dict(m)
        algo = m.pop("algorithm", None)
        if not isinstance(algo, str) or not algo:
            raise StudyError(f"[[method]] #{i + 1}: give algorithm = \"...\" ({', '.join(sorted(registry))})")
        name = m.pop("name", algo)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise StudyError(f"[[method]] #{i + 1}: name {name!r} must be letters, digits, _ . - (a folder name)")
        if name in names:
            raise StudyError(f"two methods are named {name!r}: give each [[method]] its own name")
        if algo not in registry:
            raise StudyError(f"method {name!r}: unknown algorithm {algo!r}; choose one of "
                             f"{', '.join(sorted(registry))}")
        names.append(name)
        over = {}
        for sec in _METHOD_TABLES:
            over[sec] = _table(m, sec, f"[[method]] {name!r}: ")
            m.pop(sec, None)
        bad = [k for k in _SET_BY_STUDY["run"] if k in over["run"]]
        if bad:
            raise StudyError(f"method {name!r}: [method.run] {', '.join(bad)} is set by the study (seeds, budget, out)")
        for seed in seeds:
            cfg_d = {"data": {**shared["data"], "seed": seed},
                     "model": {**shared["model"], **over["model"]},
                     "topology": {**shared["topology"], **over["topology"]},
                     "algorithm": {"name": algo, **m},
                     "run": {**shared["run"], **over["run"], "seed": seed, "steps": 0,
                             "epochs": float(value if kind == "epochs" else max_epochs),
                             "out": os.path.join(out_dir, name), "name": f"seed{seed}", "resume": "auto"},
                     "comm": dict(shared["comm"])}
            try:
                cfg = C.from_dict(cfg_d)
            except MpidlError as e:
                raise StudyError(f"method {name!r}: {e}") from None
            if seed == seeds[0] and size is not None:
                _model_form(name, cfg, size)
            runs.append({"method": name, "algorithm": algo, "seed": seed, "config": C.to_dict(cfg),
                         "dir": os.path.join(out_dir, name, f"seed{seed}")})
        info.append({"name": name, "algorithm": algo})
    return {"title": str(d.get("title", stem)), "out": out_dir, "budget": {"kind": kind, "value": value},
            "seeds": list(seeds), "methods": info, "runs": runs, "world_size": size,
            "max_epochs": float(max_epochs), "warmup": warmup}


# -- run state on disk (Local, rank 0) ----------------------------------------------------

def _write_json(path, obj):
    """Local. Write ``obj`` as JSON to ``path`` atomically (tmp, fsync, rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _budget_met(budget, row):
    kind, v = budget["kind"], budget["value"]
    key = {"epochs": "epoch", "wall_seconds": "wall", "bytes": "bytes_sent"}[kind]
    x = row.get(key)
    return x is not None and math.isfinite(x) and x >= v * (1 - 1e-9)


def _finished_results(run, budget):
    """Local. The last eval row of a complete results file that reached the budget, else None.

    Covers a study killed between a run's end and its ``done.json``.
    """
    from mpidl.metrics import ResultsError, load_results
    path = os.path.join(run["dir"], "results.h5")
    if not os.path.exists(path):     # only a closed file counts (a .tmp is a run in progress)
        return None
    try:
        ev = load_results(path)["series"].get("eval")
    except ResultsError:
        return None
    if not ev or not len(ev["step"]):
        return None
    row = {k: float(v[-1]) for k, v in ev.items() if getattr(v, "ndim", 0) == 1}
    total_epochs = run["config"]["run"]["epochs"]
    if _budget_met(budget, row) or row.get("epoch", 0) >= total_epochs * (1 - 1e-9):
        return row
    return None


def _pin_config(run):
    os.makedirs(run["dir"], exist_ok=True)
    _write_json(os.path.join(run["dir"], "config.json"), run["config"])


def _run_state(run, budget):
    """Local. ``"done"`` (finished earlier), ``"resume"`` (started earlier) or ``"new"``; raises on a changed config."""
    done = os.path.join(run["dir"], "done.json")
    pinned = os.path.join(run["dir"], "config.json")
    if os.path.exists(pinned):
        with open(pinned) as f:
            old = json.load(f)
        if old != run["config"]:
            diff = sorted(f"{s}.{k}" for s in run["config"] for k in set(run["config"][s]) | set(old.get(s, {}))
                          if old.get(s, {}).get(k) != run["config"][s].get(k))
            raise StudyError(f"{run['dir']} holds a run of {run['method']} with other settings "
                             f"({', '.join(diff)}); use another out folder or delete it")
    if os.path.exists(done):
        return "done"
    row = _finished_results(run, budget)
    if row is not None:
        _write_json(done, {"method": run["method"], "seed": run["seed"], "stop": "budget", "recovered": True,
                           "test_acc": row.get("test_acc"), "step": row.get("step")})
        return "done"
    ck = os.path.join(run["dir"], "checkpoints")
    if os.path.isdir(ck) and any(re.match(r"^step_\d+$", n) for n in os.listdir(ck)):
        return "resume"
    return "new"


# -- running (Collective) -----------------------------------------------------------

def _agree(comm, fn):
    """Collective. Run ``fn`` on rank 0; every rank gets its value or raises its MpidlError/OSError."""
    payload = None
    if comm.Get_rank() == 0:
        try:
            payload = ("ok", fn())
        except (MpidlError, OSError) as e:
            payload = ("error", str(e))
    payload = comm.bcast(payload, root=0)
    if payload[0] == "error":
        raise StudyError(payload[1])
    return payload[1]


def _hook(budget, rank):
    kind = budget["kind"]
    if kind == "epochs":
        return None

    def should_stop(k, row):  # rank 0's row is the one written to the results file
        return rank == 0 and _budget_met(budget, row)
    return should_stop


def _warm_up(run, comm):
    """Collective. One untimed step and one evaluation of ``run``'s method in a scratch folder.

    The first use of a method in a process compiles its Numba kernels and warms
    torch; without this the first timed run of each method would carry that
    one-time cost in its wall-time budget.
    """
    import shutil

    from mpidl.driver import train
    d = json.loads(json.dumps(run["config"]))
    scratch = os.path.join(os.path.dirname(os.path.dirname(run["dir"])), "_warmup")
    d["run"].update(out=scratch, name=run["method"], steps=1, log_every=1, eval_every=1, checkpoint_every=10**9,
                    resume="no")
    with _quiet(True):
        train(C.from_dict(d), comm)
    _agree(comm, lambda: shutil.rmtree(os.path.join(scratch, run["method"]), ignore_errors=True))


LOAD_PERIOD_S = 2.0
"""Seconds between two samples of the 1-minute load average during a run (rank 0)."""


class _LoadSampler:
    """Local (rank 0). Samples ``os.getloadavg()[0]`` at the start, every ``period`` seconds
    and at the end of a run, on a daemon thread that sleeps in between (no measurable cost);
    :meth:`summary` gives ``{"mean", "min", "max", "samples"}`` (None without getloadavg)."""

    def __init__(self, period=LOAD_PERIOD_S):
        import threading
        self.period, self.samples = float(period), []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpidl-load", daemon=True)

    def _sample(self):
        with contextlib.suppress(OSError, AttributeError):
            self.samples.append(float(os.getloadavg()[0]))

    def _run(self):
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False

    def summary(self):
        if not self.samples:
            return None
        return {"mean": sum(self.samples) / len(self.samples), "min": min(self.samples),
                "max": max(self.samples), "samples": len(self.samples)}


def machine_facts(comm) -> dict:
    """Collective over ``comm``. Where a study runs, for its report: ranks, nodes (the MPI's own
    shared-memory nodes, :func:`mpidl.comm.core.node_info`), ranks per node, rank 0's host name and
    core count, and the link rate when known: ``MPIDL_LINK_RATE`` in rank 0's environment (set
    by ``scripts/cluster/vnodes.sh``'s mpiexec to the emulated links' rate; set it yourself to
    name a real cluster's interconnect), else None."""
    import platform

    from mpidl.comm.core import node_info
    info = node_info(comm)
    per_node = comm.allgather(info.local_size)
    return {"ranks": comm.Get_size(), "nodes": info.n_nodes, "ranks_per_node": sorted(set(per_node)),
            "host": platform.node(), "cpus": os.cpu_count(),
            "link": os.environ.get("MPIDL_LINK_RATE") or None}


def _fmt_time(s):
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, r = divmod(s, 3600)
    m, s = divmod(r, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@contextlib.contextmanager
def _quiet(enabled):
    """The driver's per-step progress and per-eval lines are muted while a study runs (unless verbose)."""
    names = ("mpidl.progress", "mpidl.driver", "mpidl.metrics", "mpidl.checkpoint")
    old = {n: logging.getLogger(n).level for n in names}
    if enabled:
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, lv in old.items():
            logging.getLogger(n).setLevel(lv)


def compare(study, comm=None, *, out=None, report_only=False, verbose=False) -> dict:
    """Collective. Run (or resume) a study and write its report; return the report summary (every rank).

    ``study``: a TOML path or the same content as a dict.  ``comm``: an
    mpi4py communicator (default ``COMM_WORLD``).  ``out`` overrides the
    study's ``out``.  ``report_only`` writes the report from the runs on disk
    without starting any.  Returns ``{"out", "report", "summary", "stopped"}``;
    ``stopped`` is True when a stop signal ended the study early (rerun it to
    continue).
    """
    from mpidl.driver import DivergenceError, train
    from mpidl.study_report import write_report
    if comm is None:
        from mpidl.comm import world
        comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    plan = _agree(comm, lambda: plan_study(study, None if report_only else size, out))
    runs, budget = plan["runs"], plan["budget"]

    def prepare():
        os.makedirs(plan["out"], exist_ok=True)
        states = [_run_state(r, budget) for r in runs]   # every config check before any run
        _write_json(os.path.join(plan["out"], "plan.json"), plan)
        return states
    states = _agree(comm, prepare)
    todo = [i for i, s in enumerate(states) if s != "done"]
    b = budget
    if rank == 0:
        log.info("compare %s: %d method(s) x %d seed(s) at %d ranks, budget %s = %g; %d run(s) to do, "
                 "%d already finished; out %s", plan["title"], len(plan["methods"]), len(plan["seeds"]), size,
                 b["kind"], b["value"], 0 if report_only else len(todo), len(runs) - len(todo), plan["out"])
    stopped = False
    durations = []
    t_study = time.monotonic()
    machine = None if report_only else machine_facts(comm)
    if plan["warmup"] and not report_only:
        # before any timed run: compiles each method's kernels (so no first seed pays for it in its
        # wall budget) and sets up every method once, so a method that cannot run at this world size
        # fails here, with its one error, before any run has started
        first = {}
        for i in todo:
            first.setdefault(runs[i]["method"], runs[i])
        for name, run in first.items():
            if rank == 0:
                log.info("compare: warming up %s (one untimed step and one evaluation)", name)
            _warm_up(run, comm)
    for n_done, i in enumerate([] if report_only else todo):
        run = runs[i]
        tag = f"run {i + 1}/{len(runs)} {run['method']} seed {run['seed']}"
        left = len(todo) - n_done
        if durations:
            eta = sum(durations) / len(durations) * left
        elif b["kind"] == "wall_seconds":
            eta = b["value"] * left
        else:
            eta = None
        if rank == 0:
            how = "resuming from its checkpoint" if states[i] == "resume" else "started"
            log.info("compare: %s %s (%d/%d to do, study ETA %s)", tag, how, n_done + 1, len(todo), _fmt_time(eta))
        _agree(comm, lambda: _pin_config(run))
        cfg = C.from_dict(run["config"])
        t0 = time.monotonic()
        load = _LoadSampler() if rank == 0 else contextlib.nullcontext()
        try:
            with _quiet(not verbose), load:
                res = train(cfg, comm, should_stop=_hook(budget, rank))
        except DivergenceError as e:
            res = {"stop": "diverged", "error": str(e)}
        dt = time.monotonic() - t0
        if res["stop"] == "preempted":
            stopped = True
            if rank == 0:
                log.info("compare: stop signal: %s saved at step %d; rerun the same command to continue",
                         tag, res["step"])
            break
        if res["stop"] == "max_steps":   # not reachable from the CLI; keep the run unfinished
            break
        durations.append(dt)
        marker = {"method": run["method"], "seed": run["seed"], "stop": res["stop"], "step": res.get("step"),
                  "test_acc": res.get("test_acc"), "seconds": dt, "error": res.get("error"),
                  "machine": machine, "load": load.summary() if rank == 0 else None}
        _agree(comm, lambda: _write_json(os.path.join(run["dir"], "done.json"), marker))
        if rank == 0:
            left -= 1
            eta = sum(durations) / len(durations) * left
            if res["stop"] == "diverged":
                log.info("compare: %s diverged (%s); study ETA %s", tag, res["error"], _fmt_time(eta))
            else:
                log.info("compare: %s finished (%s) in %.1f s: step %d, epoch %.2f, test acc %.4f, "
                         "%.3g MB sent; study ETA %s", tag, res["stop"], dt, res["step"], res.get("epoch", math.nan),
                         res.get("test_acc", math.nan), res.get("bytes_sent", math.nan) / 1e6, _fmt_time(eta))
    if rank == 0 and os.path.isdir(os.path.join(plan["out"], "_warmup")):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(plan["out"], "_warmup"))
    summary = _agree(comm, lambda: write_report(plan)) if not stopped else None
    if rank == 0 and summary is not None:
        log.info("compare: report in %s (%.0f s for %d run(s) in this invocation)",
                 os.path.join(plan["out"], "report.md"), time.monotonic() - t_study, len(durations))
    return {"out": plan["out"], "report": os.path.join(plan["out"], "report.md"), "summary": summary,
            "stopped": stopped}
