"""Hands engine events from the engine thread to the asyncio event loop, one wake-up per engine step."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request


class Channel:
    """One request's inbox on the event loop; the engine pushes, the handler drains."""

    def __init__(self) -> None:
        self._events: list = []
        self._wakeup = asyncio.Event()

    def push(self, events: list) -> None:
        self._events.extend(events)
        self._wakeup.set()

    async def drain(self) -> list:
        while not self._events:
            self._wakeup.clear()
            await self._wakeup.wait()
        out, self._events = self._events, []
        return out


def make_deliver(loop: asyncio.AbstractEventLoop):
    """The engine's `deliver`: called on the engine thread with every listener's events of one step."""

    def dispatch(batch: Iterable[tuple[Any, list]]) -> None:
        for channel, events in batch:
            channel.push(events)

    def deliver(batch: list[tuple[Any, list]]) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(dispatch, batch)

    return deliver


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
