"""Reporting to observers (the metrics module's): an event reaches each one, and one that fails is logged,
never fatal to the engine, the model pool or the server that reported it.

Events are methods of a protocol (engine.EngineStats, pool.PoolObserver) and are called as methods of a
`Fanout`: `events.on_step(rows, seconds, steps)`. An event the protocol does not declare is an
AttributeError where it is called, so a misspelt one fails in the tests instead of going unreported."""

from __future__ import annotations

import logging

log = logging.getLogger("charlstm.observers")


class Fanout:
    """Every observer's method of an event's name, called as one method. `observers` is kept, not copied:
    one added later hears the events from then on."""

    def __init__(self, protocol: type, observers: list | None = None):
        self._events = frozenset(name for name in vars(protocol) if name.startswith("on_"))
        self._protocol = protocol.__name__
        self.observers = [] if observers is None else observers

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._events:
            raise AttributeError(f"{name!r} is not an event of {self._protocol}")
        observers = self.observers

        def event(*args) -> None:
            for obs in observers:
                try:
                    getattr(obs, name)(*args)
                except Exception:
                    log.exception("observer %s.%s failed", type(obs).__name__, name)

        setattr(self, name, event)  # found directly from now on
        return event
