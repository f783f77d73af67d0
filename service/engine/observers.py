"""Reporting to observers (the metrics module's): a number reaches each one, and one that fails is logged,
never fatal to the engine, the model pool or the server that reported it."""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger("charlstm.observers")


def notify_all(observers: Iterable[object], method: str, *args) -> None:
    for obs in observers:
        try:
            getattr(obs, method)(*args)
        except Exception:
            log.exception("observer %s.%s failed", type(obs).__name__, method)
