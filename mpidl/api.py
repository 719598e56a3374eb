"""The Python entry points: ``mpidl.train(cfg)`` and ``mpidl.fit(model, train, ...)``.

Both are thin, as the CLI is: they build (or take) one validated
:class:`mpidl.Config` and call the one driver (:func:`mpidl.driver.train`), so
checkpoints, resume, preemption, the results file and progress output are the
CLI's.  See docs/python-api.md.
"""
from __future__ import annotations

from mpidl import config as C
from mpidl.errors import MpidlError

__all__ = ["train"]


def _world(comm):
    if comm is not None:
        return comm
    from mpidl.comm import init_world
    return init_world()


def train(cfg, comm=None) -> dict:
    """Collective. Run the job ``cfg`` describes (as ``python -m mpidl run``); return the final metrics.

    ``comm`` is an mpi4py communicator (default ``MPI.COMM_WORLD``; under a
    plain ``python script.py`` a world of one rank).  Every rank gets the same
    dict: ``test_acc``, ``test_loss``, ``train_loss``, ``bytes_sent``,
    ``step``, ``out`` (the run folder, holding ``results.h5`` and
    ``checkpoints/``) and the family's own metrics.
    """
    if not isinstance(cfg, C.Config):
        raise TypeError(f"mpidl.train needs an mpidl.Config (Config.from_toml(path), Config.from_dict(d)), "
                        f"got {type(cfg).__name__}")
    from mpidl.driver import train as run
    return run(cfg, _world(comm))
