"""Logging set-up: rank 0 logs INFO to stdout, other ranks WARNING to stderr.

Library modules log through ``logging.getLogger("mpidl....")`` and never
print; :func:`setup` is called once by the CLI (or by a user script).
"""
import logging
import sys


class _RankFormatter(logging.Formatter):
    def __init__(self, rank):
        super().__init__("%(message)s" if rank == 0 else f"[rank {rank:03d}] %(levelname)s %(message)s")


class _StdHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout / sys.stderr is at emit time (survives stream swaps)."""

    def __init__(self, err: bool):
        self._err = err
        super().__init__()

    @property
    def stream(self):
        return sys.stderr if self._err else sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup(rank: int = 0, level=None) -> logging.Logger:
    """Local. Configure the ``mpidl`` logger for this rank and return it."""
    logger = logging.getLogger("mpidl")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = _StdHandler(err=rank != 0)
    handler.setFormatter(_RankFormatter(rank))
    logger.addHandler(handler)
    logger.setLevel(level if level is not None else (logging.INFO if rank == 0 else logging.WARNING))
    logger.propagate = False
    return logger
