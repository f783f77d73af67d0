"""The session store's health as the probes read it: kept fresh by a background sweep, so `/ready` never
waits on a store (a Redis that accepts connections and never answers once held it for 8 s, and under
load for 40 s, while generation, which needs no store, answered in 20 ms).

Every second the sweep purges expired sessions through the store (its real work, and the check):
success marks the store available, a failure or an answer slower than the store's own time budget
marks it unavailable, with the error. `/ready` reports that state in its body and stays 200 while
the engine can generate: a store outage takes away sessions, not the replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

from .store import SessionStore

log = logging.getLogger("charlstm.sessions")


class StoreHealth:
    def __init__(self, store: SessionStore, budget_s: float, clock=time.monotonic, wall=time.time):
        """`budget_s`: the longest one store operation may take (the store's timeouts); a check still
        waiting past it counts as a failure."""
        self.store, self.budget_s, self.clock, self.wall = store, budget_s, clock, wall
        self.available: bool | None = None  # None: not checked yet
        self.error: str | None = None
        self.checked_at: float | None = None  # wall clock of the last answer
        self._waiting_since: float | None = None  # monotonic start of a check still in flight

    def begin(self) -> None:
        self._waiting_since = self.clock()

    def end(self, error: BaseException | None) -> None:
        self._waiting_since = None
        was = self.available
        self.available, self.checked_at = error is None, self.wall()
        self.error = None if error is None else f"{type(error).__name__}: {error}"
        if error is not None and was is not False:
            log.warning("the session store is unavailable (%s); session routes answer 503 until it is back", self.error)
        elif error is None and was is False:
            log.warning("the session store is back")

    def status(self) -> dict:
        """What /ready shows, from memory only."""
        available, error = self.available, self.error
        if self._waiting_since is not None and self.clock() - self._waiting_since > self.budget_s:
            available, error = False, f"no answer for {self.clock() - self._waiting_since:.1f} s"
        return {**self.store.describe(), "available": available, "checked_at": self.checked_at, "error": error}

    async def check(self, executor: Executor) -> None:
        """One pass: purge expired sessions in the session layer's own threads; its outcome is the health."""
        self.begin()
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self.store.purge_expired)
        except Exception as e:
            self.end(e)
        else:
            self.end(None)

    async def sweep(self, executor: Executor, every_s: float = 1.0) -> None:
        """A check every `every_s` for as long as the server runs."""
        while True:
            await asyncio.sleep(every_s)
            await self.check(executor)
