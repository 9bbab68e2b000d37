"""A readers-writer lock for a model shared between threads.

Encodes and decodes read the weights while the kernels run without the GIL; a training step
writes them. ``ReadWriteLock`` lets any number of readers in together and a writer in alone,
and prefers writers: once a writer waits, new readers wait behind it, so a stream of
encodes cannot starve training. It is not reentrant: a thread holding either side must not
ask for it again (with a writer waiting, a second read would wait for ever).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class _Side:
    """One side of a ReadWriteLock as a context manager: a plain class with slots, as
    every encode enters one (contextlib's generator-based managers cost more)."""

    __slots__ = ("acquire", "release")

    def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
        self.acquire, self.release = acquire, release

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class ReadWriteLock:
    """Shared reads, exclusive writes, writers first: ``with lock.read:`` and
    ``with lock.write:``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self.read = _Side(self._acquire_read, self._release_read)
        self.write = _Side(self._acquire_write, self._release_write)

    def _acquire_read(self) -> None:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def _acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: let the readers it held back in
                self._writers_waiting -= 1
                self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writing = True

    def _release_write(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()


class _NoLock:
    """A stand-in with ReadWriteLock's interface that excludes nothing: what the model
    state did before it had a lock. For benchmarks (``benchmarks/bench_lock.py``) only."""

    def __init__(self) -> None:
        nothing = _Side(lambda: None, lambda: None)
        self.read = self.write = nothing
