"""Checkpoints: every agent's state in HDF5, atomic folders, exact resume, preemption.

Layout of a checkpoint root::

    ROOT/step_00000120/manifest.json      written last, by rank 0
    ROOT/step_00000120/rank_00000.h5      agent 0's state (one file per rank)
    ROOT/step_00000120/rank_00001.h5      ...
    ROOT/step_00000130.tmp/               a save in progress (or interrupted): ignored

:meth:`CheckpointStore.save` is collective: rank 0 creates ``step_N.tmp/``;
each rank writes and fsyncs ``rank_R.h5``; the ranks agree that every write
succeeded (one collective, which is also the barrier) and share their files'
CRC-32 checksums; rank 0 then writes ``manifest.json`` (world size, topology
digest, algorithm, versions, checksums and the caller's ``meta``) and renames
the folder to ``step_N``.  A folder without a manifest, or still named
``.tmp``, is incomplete by definition, so a crash at any point leaves the
previous checkpoint intact and never a half-written one that looks complete.
The newest ``keep`` complete checkpoints are kept.

State dictionaries map names to NumPy arrays, NumPy scalars, Python
``int``/``float``/``bool``/``str``/``bytes``/``None``, JSON-able lists and
tuples, CPU torch tensors, or nested dicts of these.  They round-trip
bit-exactly, with their types (Python ints of any size included, as in
NumPy's PCG64 state).

:meth:`CheckpointStore.load` checks world size, ``expect`` (algorithm,
topology digest, ...) and the shapes and dtypes of ``like``; a mismatch or a
damaged file raises :class:`CheckpointError` on every rank.

The single-file parallel layout (h5py ``driver="mpio"``) is not implemented:
every rank always writes its own file, which works with serial and parallel
builds of h5py alike.

:class:`PreemptionGuard` turns SIGTERM/SIGUSR1 (what Slurm sends before a
preemption or at ``--signal``) into a flag that the ranks agree on at a step
boundary with a nonblocking allreduce started one step earlier (so the check
costs nothing in the common case); the driver then saves and exits 0.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import zlib
from contextlib import contextmanager

import numpy as np

from mpidl.errors import MpidlError
from mpidl.h5state import compare_like as _compare_like
from mpidl.h5state import open_read
from mpidl.h5state import read_tree as _read_tree
from mpidl.h5state import write_tree as _write_tree

__all__ = ["CheckpointStore", "CheckpointError", "PreemptionGuard", "catch_early_signals", "rng_state",
           "set_rng_state", "topology_digest", "list_checkpoints", "read_manifest", "verify_checkpoint"]

log = logging.getLogger("mpidl.checkpoint")

FORMAT = "mpidl-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(MpidlError):
    """A checkpoint that cannot be written, found or used (raised on every rank)."""


# -- helpers -----------------------------------------------------------------------
class _Solo:
    """Local stand-in for a one-rank GraphComm (serial use, tests, CLI)."""

    rank, size = 0, 1

    def barrier(self):
        pass

    def bcast(self, obj, root=0):
        return obj

    def allreduce(self, x, op="sum"):
        return np.array(x, copy=True) if isinstance(x, np.ndarray) else x

    def agree(self, error=None):
        if error is not None:
            from mpidl.comm import CollectiveError
            raise CollectiveError(str(error))


@contextmanager
def _uncounted(comm):
    """Bookkeeping collectives are not charged to the algorithm's byte/message counters."""
    b, m = getattr(comm, "bytes_sent", None), getattr(comm, "messages_sent", None)
    try:
        yield
    finally:
        if b is not None:
            try:
                comm.bytes_sent, comm.messages_sent = b, m
            except AttributeError:
                pass


def _agree(comm, err):
    if isinstance(comm, _Solo):
        if err is not None:
            raise CheckpointError(str(err))
        return
    from mpidl.comm import CollectiveError
    try:
        comm.agree(None if err is None else str(err))
    except CollectiveError as e:
        raise CheckpointError(str(e)) from None


def topology_digest(topology) -> str | None:
    """Local. Short SHA-256 of a topology's size and weights (None for None)."""
    if topology is None:
        return None
    import hashlib
    w = np.ascontiguousarray(getattr(topology, "weights", topology), dtype=np.float64)
    h = hashlib.sha256(repr(w.shape).encode() + w.tobytes()).hexdigest()
    return h[:16]


def _crc32(path, bufsize=1 << 20):
    crc, n = 0, 0
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                return crc & 0xFFFFFFFF, n
            crc = zlib.crc32(b, crc)
            n += len(b)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _versions():
    import h5py
    from mpidl import __version__
    v = {"mpidl": __version__, "numpy": np.__version__, "h5py": h5py.__version__,
         "hdf5": h5py.version.hdf5_version, "python": sys.version.split()[0]}
    if "torch" in sys.modules:
        v["torch"] = sys.modules["torch"].__version__
    return v


# -- manifests (Local) ----------------------------------------------------------------
def read_manifest(path) -> dict:
    """Local. Parse ``path/manifest.json`` of a checkpoint folder; CheckpointError if absent or bad."""
    mp = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open(mp) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint manifest {mp} is unreadable: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{mp} is not an mpidl checkpoint manifest")
    return m


def list_checkpoints(root) -> list:
    """Local. Every ``step_N`` / ``step_N.tmp`` folder under ``root``, oldest first.

    Each entry: ``step``, ``path``, ``complete`` (a valid manifest), ``manifest``
    (or None), ``problem`` (why incomplete, or None).
    """
    root = os.fspath(root)
    out = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        m = re.match(r"^step_(\d+)(\.tmp|\.old)?$", name)
        p = os.path.join(root, name)
        if not m or not os.path.isdir(p):
            continue
        entry = {"step": int(m.group(1)), "path": p, "complete": False, "manifest": None, "problem": None}
        if m.group(2):
            entry["problem"] = "interrupted save" if m.group(2) == ".tmp" else "replaced, not yet deleted"
        else:
            try:
                man = read_manifest(p)
                if man.get("step") != entry["step"]:
                    raise CheckpointError(f"manifest says step {man.get('step')}")
                entry.update(complete=True, manifest=man)
            except CheckpointError as e:
                entry["problem"] = str(e)
        out.append(entry)
    out.sort(key=lambda e: (e["step"], e["complete"]))
    return out


def verify_checkpoint(path) -> list:
    """Local. Check every rank file of a checkpoint (size, CRC-32, HDF5 readable); return problems."""
    try:
        man = read_manifest(path)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for r, fe in enumerate(man.get("files", [])):
        fp = os.path.join(os.fspath(path), fe["name"])
        if not os.path.isfile(fp):
            problems.append(f"rank {r}: {fp} is missing")
            continue
        crc, n = _crc32(fp)
        if n != fe["bytes"] or crc != fe["crc32"]:
            problems.append(f"rank {r}: {fp} is damaged ({n} bytes, crc {crc:08x}; "
                            f"manifest: {fe['bytes']} bytes, crc {fe['crc32']:08x})")
            continue
        try:
            with open_read(fp) as f:
                _read_tree(f["state"])
        except (OSError, KeyError, ValueError) as e:
            problems.append(f"rank {r}: {fp} cannot be read: {e}")
    return problems


# -- the store -----------------------------------------------------------------------
class CheckpointStore:
    """Collective. Checkpoints of every agent under ``root``; keeps the newest ``keep``.

    ``comm`` is a :class:`mpidl.comm.GraphComm` (or None for one process).
    Every method except the ``path`` helpers is collective.
    """

    def __init__(self, root, comm=None, keep: int | None = 3, fsync: bool = True):
        self.root = os.path.abspath(os.fspath(root))
        self.comm = comm if comm is not None else _Solo()
        self.keep = keep
        self.fsync = fsync

    def path(self, step: int) -> str:
        """Local. Folder of the complete checkpoint of ``step``."""
        return os.path.join(self.root, f"step_{int(step):08d}")

    def _file(self, folder, rank):
        return os.path.join(folder, f"rank_{rank:05d}.h5")

    # -- save ----------------------------------------------------------------------
    def save(self, step: int, state: dict, meta: dict | None = None) -> str:
        """Collective. Write ``state`` (this rank's) and ``meta`` (rank 0's) as checkpoint ``step``.

        Returns the checkpoint folder.  On any failure every rank raises
        :class:`CheckpointError` and the previous checkpoints are untouched.
        """
        comm, step = self.comm, int(step)
        if step < 0:
            raise CheckpointError(f"checkpoint step must be >= 0, got {step}")
        final = self.path(step)
        tmp = final + ".tmp"
        meta = {} if meta is None else meta
        with _uncounted(comm):
            err, meta_json = None, None
            if comm.rank == 0:
                try:
                    meta_json = json.loads(json.dumps(meta, default=_json_default, allow_nan=True))
                    os.makedirs(self.root, exist_ok=True)
                    if os.path.exists(tmp):
                        shutil.rmtree(tmp)
                    os.mkdir(tmp)
                except (TypeError, ValueError) as e:
                    err = f"checkpoint meta is not JSON-able: {e}"
                except OSError as e:
                    err = f"cannot create checkpoint folder {tmp}: {e}"
            _agree(comm, err)
            err, crc, nbytes = None, 0, 0
            fpath = self._file(tmp, comm.rank)
            try:
                self._write_rank(fpath, step, state)
                crc, nbytes = _crc32(fpath)
            except (OSError, TypeError, ValueError) as e:
                err = f"rank {comm.rank}: cannot write checkpoint file {fpath}: {e}"
            try:
                _agree(comm, err)
            except CheckpointError:
                if comm.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            info = np.zeros((comm.size, 2), dtype=np.int64)
            info[comm.rank] = (crc, nbytes)
            info = np.asarray(comm.allreduce(info, "sum")) if comm.size > 1 else info
            err = None
            if comm.rank == 0:
                try:
                    self._finalise(step, tmp, final, info, meta_json)
                except OSError as e:
                    err = f"cannot finalise checkpoint {final}: {e}"
            _agree(comm, err)
        log.info("checkpoint: saved step %d to %s", step, final)
        return final

    def _write_rank(self, fpath, step, state):
        import h5py
        with h5py.File(fpath, "w", track_order=True) as f:
            f.attrs["format"] = FORMAT
            f.attrs["step"] = step
            f.attrs["rank"] = self.comm.rank
            f.attrs["world_size"] = self.comm.size
            _write_tree(f.create_group("state", track_order=True), state)
        if self.fsync:
            _fsync(fpath)

    def _finalise(self, step, tmp, final, info, meta):
        topo = getattr(self.comm, "topology", None)
        man = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "world_size": self.comm.size, "layout": "per-rank",
            "topology": topology_digest(topo) if topo is not None else meta.get("topology_digest"),
            "topology_name": getattr(topo, "name", None),
            "algorithm": meta.get("algorithm"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "time": time.time(),
            "versions": _versions(),
            "files": [{"name": f"rank_{r:05d}.h5", "crc32": int(info[r, 0]), "bytes": int(info[r, 1])}
                      for r in range(self.comm.size)],
            "meta": meta,
        }
        part = os.path.join(tmp, MANIFEST + ".part")
        with open(part, "w") as f:
            json.dump(man, f, indent=1, allow_nan=True)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(part, os.path.join(tmp, MANIFEST))
        old = final + ".old"
        if os.path.exists(final):  # saving the same step again: swap, then drop the old one
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        if self.fsync:
            _fsync(self.root)
        shutil.rmtree(old, ignore_errors=True)
        self._prune(step)

    def _prune(self, current):
        entries = list_checkpoints(self.root)
        for e in entries:  # leftovers of interrupted saves
            if e["path"].endswith((".tmp", ".old")):
                shutil.rmtree(e["path"], ignore_errors=True)
        if self.keep:
            done = [e for e in entries if e["complete"]]
            for e in done[:-int(self.keep)]:
                shutil.rmtree(e["path"], ignore_errors=True)

    # -- find and load --------------------------------------------------------------
    def latest(self) -> int | None:
        """Collective. Newest complete checkpoint step (the same on every rank), or None."""
        step = None
        if self.comm.rank == 0:
            done = [e["step"] for e in list_checkpoints(self.root) if e["complete"]]
            step = max(done) if done else None
        with _uncounted(self.comm):
            return self.comm.bcast(step, 0)

    def steps(self) -> list:
        """Collective. All complete checkpoint steps, oldest first."""
        done = None
        if self.comm.rank == 0:
            done = [e["step"] for e in list_checkpoints(self.root) if e["complete"]]
        with _uncounted(self.comm):
            return self.comm.bcast(done, 0)

    def manifest(self, step: int) -> dict:
        """Collective. The manifest of checkpoint ``step`` (read by rank 0, broadcast)."""
        man, err = None, None
        if self.comm.rank == 0:
            try:
                man = read_manifest(self.path(step))
            except CheckpointError as e:
                err = str(e)
        with _uncounted(self.comm):
            _agree(self.comm, err)
            return self.comm.bcast(man, 0)

    def load(self, step: int | None = None, like: dict | None = None,
             expect: dict | None = None, in_place: bool = False) -> tuple:
        """Collective. Return ``(state, meta)`` of checkpoint ``step`` (None: the newest).

        Checks, on every rank together: the world size, each ``expect`` item
        against the manifest (top level first, then ``meta``), this rank's file
        checksum and, with ``like``, the names, shapes and dtypes of the state.
        ``in_place``: arrays are read into ``like``'s arrays where name, shape
        and dtype match (no second copy of the state; ``like`` is overwritten,
        also when a later check fails).
        """
        comm = self.comm
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.root}")
        man = self.manifest(step)
        where = self.path(step)
        if man.get("world_size") != comm.size:
            raise CheckpointError(f"checkpoint {where} was written by {man.get('world_size')} ranks but this job "
                                  f"has {comm.size}; resume with mpiexec -n {man.get('world_size')}, or set [run] resize = "
                                  f"\"average\" to continue on {comm.size} ranks (docs/checkpoints.md)")
        for key, want in (expect or {}).items():
            got = man[key] if key in man else man.get("meta", {}).get(key, "<not recorded>")
            if got != want:
                raise CheckpointError(f"checkpoint {where}: {key} is {got!r} but this run has {want!r}; "
                                      "resume with the same settings or use a new checkpoint folder")
        err, state = None, None
        fpath = self._file(where, comm.rank)
        try:
            self.verify_file(step, comm.rank, man)
            with open_read(fpath) as f:
                state = _read_tree(f["state"], like if in_place else None)
            if like is not None:
                msg = _compare_like(state, like)
                if msg:
                    raise CheckpointError(f"rank {comm.rank}: checkpoint {where} does not fit this run: {msg}")
        except CheckpointError as e:
            err = str(e)
        except (OSError, KeyError, ValueError, IndexError, TypeError) as e:
            err = f"rank {comm.rank}: cannot read checkpoint file {fpath}: {e}"
        with _uncounted(comm):
            _agree(comm, err)
        log.info("checkpoint: loaded step %d from %s", step, where)
        return state, man.get("meta", {})


    def verify_file(self, step: int, rank: int, man: dict) -> str:
        """Local. Path of rank ``rank``'s file of checkpoint ``step`` after checking it against the
        manifest ``man`` (present, size and CRC-32); CheckpointError otherwise."""
        fpath = self._file(self.path(step), rank)
        fe = man["files"][rank]
        if not os.path.isfile(fpath):
            raise CheckpointError(f"rank {rank}: {fpath} is missing")
        crc, n = _crc32(fpath)
        if n != fe["bytes"] or crc != fe["crc32"]:
            raise CheckpointError(f"rank {rank}: checkpoint file {fpath} is damaged "
                                  f"({n} bytes, crc32 {crc:08x}; the manifest says {fe['bytes']} bytes, "
                                  f"crc32 {fe['crc32']:08x})")
        return fpath


# -- RNG state ---------------------------------------------------------------------
def rng_state(generator: np.random.Generator | None = None) -> dict:
    """Local. NumPy's global RNG, ``generator`` (if given) and torch's RNGs, as a state dict.

    torch's state is captured when torch is imported: a process that never
    imported torch has never drawn from its RNG, and a resumed process starts
    torch from the same default seed.  When this process has initialised CUDA,
    ``torch_cuda`` holds the RNG state of its current device (one rank = one
    device), keyed by the device index; a CPU process writes no such entry, so
    the format is the same on both and a checkpoint moves between them.
    """
    st = {"numpy_global": np.random.get_state(legacy=False)}
    if generator is not None:
        st["generator"] = generator.bit_generator.state
    torch = sys.modules.get("torch")
    if torch is None:
        return st
    st["torch"] = torch.get_rng_state().numpy().copy()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        i = torch.cuda.current_device()
        st["torch_cuda"] = {str(i): torch.cuda.get_rng_state(i).numpy().copy()}
    return st


def set_rng_state(d: dict, generator: np.random.Generator | None = None) -> None:
    """Local. Restore what :func:`rng_state` captured (``generator`` is updated in place).

    CUDA RNG states are restored when this process has CUDA: a single saved
    state goes to the current device (a rank may resume on another GPU
    index), several to the devices with those indices that exist.  Without
    CUDA (a GPU checkpoint resumed on a CPU) they are ignored with a warning:
    the CPU RNGs are restored all the same.
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"the checkpointed RNG state is a {type(d).__name__}, expected a dict")
    if "numpy_global" in d:
        np.random.set_state(d["numpy_global"])
    if generator is not None:
        if "generator" not in d:
            raise CheckpointError("the checkpointed RNG state holds no generator state")
        generator.bit_generator.state = d["generator"]
    if "torch" in d or "torch_cuda" in d:
        import torch
        if "torch" in d:
            want = torch.get_rng_state().numel()
            arr = np.ascontiguousarray(d["torch"], dtype=np.uint8)
            if arr.shape != (want,):
                raise CheckpointError(f"the checkpointed torch RNG state has shape {arr.shape}, "
                                      f"this torch expects ({want},)")
            torch.set_rng_state(torch.from_numpy(arr))
        cuda = d.get("torch_cuda") or {}
        if cuda and not torch.cuda.is_available():
            log.warning("checkpoint holds CUDA RNG state(s) of device(s) %s but this process has no CUDA "
                        "device: ignored (the CPU RNG states are restored)", ", ".join(sorted(cuda)))
        elif cuda:
            states = {int(i): torch.from_numpy(np.ascontiguousarray(s, dtype=np.uint8)) for i, s in cuda.items()}
            if len(states) == 1:
                torch.cuda.set_rng_state(next(iter(states.values())), torch.cuda.current_device())
            else:
                n = torch.cuda.device_count()
                missing = sorted(i for i in states if i >= n)
                for i, st in states.items():
                    if i < n:
                        torch.cuda.set_rng_state(st, i)
                if missing:
                    log.warning("checkpoint holds CUDA RNG states of devices %s that this process does not "
                                "see: ignored", ", ".join(map(str, missing)))


# -- preemption --------------------------------------------------------------------
_EARLY: list = []


def catch_early_signals(signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
    """Local. Record ``signals`` that arrive before a :class:`PreemptionGuard` is entered.

    Called where a preemptible program starts (``mpidl run``): a signal sent
    while the job is still starting (imports, MPI_Init, data loading) no
    longer kills the rank; the first guard takes it over and the run stops at
    its first step boundary with a checkpoint.  After that guard, such signals
    are recorded and otherwise ignored, so the run finishes what it is doing.
    """
    for s in signals:
        signal.signal(s, lambda signum, frame: _EARLY.append(signum))


class PreemptionGuard:
    """Local to enter; :meth:`should_stop` is Collective.

    ``with PreemptionGuard(comm) as guard:`` installs handlers for
    ``signals`` (default SIGTERM and SIGUSR1) that only set a flag; at each
    step boundary every rank calls ``guard.should_stop()``, which becomes True
    on every rank at the same call once any rank got a signal.  The driver
    then saves a checkpoint and exits 0.  Previous handlers are restored on
    exit.  Give Slurm time to save: ``#SBATCH --signal=B:USR1@120`` or rely on
    the SIGTERM sent ``KillWait`` seconds before SIGKILL.

    Cost: with a :class:`~mpidl.comm.GraphComm`, call k starts a nonblocking
    max-reduction of the ranks' flags and call k + 1 completes it (by then it
    has long finished, so the wait is free) and answers from it.  Every rank
    answers from the same reduction, so all stop at the same call; the price
    is one step of latency: a signal that arrives before call k is seen at
    call k + 1.  Once True, the answer stays True with no communication.
    Without ``start_allreduce`` (one process) the flag is read directly.
    """

    def __init__(self, comm=None, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.comm = comm if comm is not None else _Solo()
        self.signals = tuple(signals)
        self.signum = None
        self._flag = False
        self._old = {}
        self._announced = False
        self._pending = None
        self._stopped = False

    def _handler(self, signum, frame):
        self._flag = True
        self.signum = signum

    def __enter__(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard: not in the main thread, signals are not caught")
            return self
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handler)
        if _EARLY:  # a signal that came before this guard (catch_early_signals)
            self._handler(_EARLY[-1], None)
            _EARLY.clear()
        return self

    def __exit__(self, exc_type, exc, tb):
        for s, h in self._old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._old.clear()
        # Every rank started the pending reduction: finish it, unless this rank failed
        # alone (a non-MpidlError), where the CLI aborts the job instead.
        if self._pending is not None and (exc_type is None or issubclass(exc_type, MpidlError)):
            self._pending.wait()
        self._pending = None
        return False

    @property
    def requested(self) -> bool:
        """Local. Whether this rank got a signal (not yet agreed)."""
        return self._flag

    def request(self, signum=None):
        """Local. Ask for a stop as if a signal had arrived (tests, time limits)."""
        self._flag = True
        self.signum = signum

    def should_stop(self) -> bool:
        """Collective. True on every rank at the same call, the call after any rank's signal was seen."""
        if self._stopped:
            return True
        start = getattr(self.comm, "start_allreduce", None)
        with _uncounted(self.comm):
            if start is None:  # one process (_Solo) or a communicator without nonblocking reductions
                stop = bool(self.comm.allreduce(1 if self._flag else 0, "max"))
            else:
                stop = False
                if self._pending is not None:
                    stop = bool(self._pending.wait()[0])
                    self._pending = None
                if not stop:
                    self._pending = start(np.array([1 if self._flag else 0], dtype=np.int32), "max")
        if stop:
            self._stopped = True
            if not self._announced:
                self._announced = True
                name = signal.Signals(self.signum).name if self.signum else "another rank's signal"
                log.info("preemption requested (%s): saving a checkpoint and stopping", name)
        return stop
