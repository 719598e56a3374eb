"""A background reader that builds the next steps' batches while the current step computes.

:class:`Prefetcher` runs ``make(k)`` for the steps after the one being
consumed, in a daemon thread, at most ``depth`` steps ahead.  ``get(k)`` hands
out step ``k``'s result in step order; asking for another step than the next
one (the first call, a resumed run, a jump) drops what was read ahead and
starts over at ``k``.  Because every item is ``make(k)`` (a pure function of
the step in mpidl: the batch order is a function of (seed, rank, k)), the
items are the same with and without the thread, and with any ``depth``.

An exception raised by ``make(k)`` is kept and raised by ``get(k)``, in the
consumer's thread, for exactly that step: a bad batch that a run never reaches
(read ahead past its last step) never raises.

The reader makes no MPI calls.  h5py serialises its calls under one lock, and
torch's operators release the GIL, so a reader thread overlaps the step's
compute.  This module imports only the standard library.
"""
from __future__ import annotations

import threading

__all__ = ["Prefetcher"]


class Prefetcher:
    """Local. Items ``make(k)`` for increasing ``k``, built ahead by one daemon thread."""

    def __init__(self, make, depth: int, name: str = "mpidl-reader"):
        if int(depth) < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.make, self.depth, self.name = make, int(depth), name
        self._cv = threading.Condition()
        self._items = {}        # step -> (ok, value) of the current generation
        self._want = None       # the step being consumed (the reader may build up to _want + depth)
        self._next = None       # the next step the reader builds
        self._gen = 0           # bumped by every restart; results of an older generation are dropped
        self._stop = False
        self._thread = None
        self.restarts = 0       # how many times get() started over (tests and benchmarks read it)

    def _run(self):
        while True:
            with self._cv:
                while not self._stop and self._next > self._want + self.depth:
                    self._cv.wait()
                if self._stop:
                    return
                k, gen = self._next, self._gen
                self._next += 1
            try:
                item = (True, self.make(k))
            except BaseException as e:  # noqa: BLE001  (kept for get(k), raised in the consumer's thread)
                item = (False, e)
            with self._cv:
                if gen == self._gen:
                    self._items[k] = item
                    self._cv.notify_all()

    def get(self, k: int):
        """Local. ``make(k)``, built ahead when ``k`` follows the previous call's step."""
        k = int(k)
        with self._cv:
            if self._stop:
                raise RuntimeError("Prefetcher.get after close")
            if self._want is None or k != self._want + 1:
                self._gen += 1
                self._items.clear()
                self._next = k
                self.restarts += 1
            self._want = k
            self._cv.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            while k not in self._items:
                self._cv.wait()
            ok, value = self._items.pop(k)
        if not ok:
            raise value
        return value

    def ready(self, k: int):
        """Local. ``make(k)`` if the reader has built it already (it stays for ``get(k)``), else None.

        Raises nothing: an item that holds an exception reads as not ready.
        """
        with self._cv:
            item = self._items.get(int(k))
        return item[1] if item is not None and item[0] else None

    def close(self) -> None:
        """Local. Stop the reader (it finishes the item it is building, then exits)."""
        with self._cv:
            self._stop = True
            self._items.clear()
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
