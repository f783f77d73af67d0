"""Fair turns on the cores for the engines of several models.

Each loaded model has its own engine, batch and thread. Stepped at the same time, two engines would each
run torch's (or ONNX Runtime's) thread pool over the same cores: oversubscribed, both slow down and neither
gets a predictable share. So an engine takes a turn for the compute of one loop (its prompt slices and one
look of its batch), and when a turn ends the next goes to the waiting engine that has used the least
compute time, as a fair-share scheduler picks the lowest virtual runtime (Linux's CFS). The share is time,
not steps: a model twice as large gets half the steps, and two models with work get equal seconds.

An engine that comes back after idling starts at the least time of the engines already in line, so it
cannot claim the time it spent idle and lock the others out. With one engine a turn is an uncontended lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ComputeShare:
    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._cv = threading.Condition()
        self._used: dict[int, float] = {}  # engine key -> compute seconds it has had (its virtual time)
        self._waiting: dict[int, int] = {}  # engine key -> arrival number (ties go to the earlier)
        self._holder: int | None = None
        self._arrivals = itertools.count()

    @contextmanager
    def turn(self, key: int) -> Iterator[None]:
        """Hold the cores for one loop's compute; blocks while another engine holds them or is owed more."""
        self.take(key)
        t0 = self.clock()
        try:
            yield
        finally:
            self.give_back(key, self.clock() - t0)

    def take(self, key: int) -> None:
        """The first half of `turn`, for a caller that times its own loop (the engine's, once a loop)."""
        with self._cv:
            if self._holder is None and not self._waiting and len(self._used) == 1 and key in self._used:
                self._holder = key  # the only engine: nobody to be fair to
                return
            others = [self._used.get(k, 0.0) for k in (*self._waiting, self._holder) if k is not None and k != key]
            if others:  # back from idle: no credit for the time away
                self._used[key] = max(self._used.get(key, 0.0), min(others))
            else:
                self._used.setdefault(key, 0.0)
            self._waiting[key] = next(self._arrivals)
            while self._holder is not None or self._next() != key:
                self._cv.wait()
            del self._waiting[key]
            self._holder = key

    def give_back(self, key: int, seconds: float) -> None:
        """The second half of `turn`: `seconds` of compute go on the engine's account."""
        with self._cv:
            self._used[key] += seconds
            self._holder = None
            if self._waiting:
                self._cv.notify_all()

    def forget(self, key: int) -> None:
        """An engine that stopped: its account goes (a new engine for the model starts afresh)."""
        with self._cv:
            self._used.pop(key, None)

    def used(self) -> dict[int, float]:
        """Compute seconds each engine has had (for /info and the benchmark)."""
        with self._cv:
            return dict(self._used)

    def waiting(self) -> int:
        """Engines waiting for a turn now."""
        with self._cv:
            return len(self._waiting)

    def _next(self) -> int:
        return min(self._waiting, key=lambda k: (self._used[k], self._waiting[k]))
