"""Hands engine events from the engine thread to the asyncio event loop, one wake-up per engine step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from starlette.requests import Request

from ..engine.types import Done, EngineError

log = logging.getLogger("charlstm.api")

T = TypeVar("T")
_finishing: set[asyncio.Task] = set()  # keeps finishing tasks alive after their handler has gone


class Channel:
    """One request's inbox on the event loop; the engine pushes, the reader takes (service/api/reader.py).

    `on_done` post-processes the stream's Done before the handler sees it (a session call commits
    there). It runs as a task of its own, so it completes even when the client has gone away."""

    def __init__(self, on_done: Callable[[Done], Awaitable[Done]] | None = None,
                 notify: Callable[[bool], None] | None = None) -> None:
        """notify(ended): called on the event loop whenever events arrive; ended: the Done is among them."""
        self._events: list = []
        self._on_done = on_done
        self._notify = notify or (lambda ended: None)
        self.ended = False  # the Done is in (maybe not yet taken)

    def push(self, events: list) -> None:
        done = bool(events) and isinstance(events[-1], Done)
        if done and self._on_done is not None:
            self._events.extend(events[:-1])
            task = asyncio.get_running_loop().create_task(self._finish(events[-1]))
            _finishing.add(task)
            task.add_done_callback(_finishing.discard)
        else:
            self._events.extend(events)
            self.ended = self.ended or done
        self._notify(self.ended)

    async def _finish(self, done: Done) -> None:
        try:
            done = await self._on_done(done)
        except Exception as e:
            if not isinstance(e, EngineError):
                log.exception("finishing a stream failed")
            done = replace(done, finish_reason="error", state=None, error=f"{getattr(e, 'type', 'internal_error')}: {e}")
        self._events.append(done)
        self.ended = True
        self._notify(True)

    def take(self) -> list:
        """Whatever has arrived (maybe nothing), without waiting."""
        out, self._events = self._events, []
        return out


def make_deliver(loop: asyncio.AbstractEventLoop):
    """The engine's `deliver`: called on the engine thread with every listener's events of one step."""

    def dispatch(batch: Iterable[tuple[Any, list]]) -> None:
        for channel, events in batch:
            try:
                channel.push(events)
            except Exception:  # one broken listener must not cost the others their events
                log.exception("pushing events to a request failed")

    def deliver(batch: list[tuple[Any, list]]) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(dispatch, batch)

    return deliver


async def until_client_leaves(request: Request, work: Awaitable[T], on_leave: Callable[[], None]) -> tuple[bool, T | None]:
    """Wait for `work` unless the client goes away first: then cancel it and call `on_leave` (which frees
    what the request holds in the engine). Returns (finished, result); an error of `work` propagates."""
    waiter = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiter.done():
            waiter.cancel()
            on_leave()
    if waiter.done() and not waiter.cancelled():
        return True, waiter.result()
    return False, None


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
