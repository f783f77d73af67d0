"""The one reader of engine events, for every protocol (llama.cpp's server has one response reader too).

A request is one or more choices (OpenAI's `n` and list prompts; a native call is one). `Responses`
submits them to the engine together, then hands their events back as they arrive: round by round to
an `async for`, or to a listener called as they arrive that takes them (`listen`, `take`: the SSE
writer); or it waits for every choice's end (`all`); and it cancels whatever is still running when the
reader stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request

from ..engine.engine import Engine, Stream
from ..engine.types import Client, Done, GenerationRequest
from .bridge import Channel, until_client_leaves
from .errors import APIError
from .identity import client_of


class Choice:
    """One choice: what was asked, and what the engine has said of it so far."""

    def __init__(self, index: int, prompt: str, first: bool, request: GenerationRequest):
        self.index, self.prompt, self.request = index, prompt, request
        self.first = first  # the first choice of its prompt: the prompt's characters count once in `usage`
        self.channel: Channel | None = None
        self.stream: Stream | None = None
        self.done: Done | None = None
        self.sent = 0  # characters of this choice's text already written out (an echoed prompt included)


class Responses:
    """The choices of one request in the engine."""

    def __init__(self, engine: Engine, choices: list[Choice], client: Client,
                 on_done: Callable[[Done], Awaitable[Done]] | None = None):
        """Submit every choice, or none (a refusal raises here, before anything is sent): the engine counts
        them as one request of `client`. `on_done` finishes a stream before its Done is read (a session commits there)."""
        self.engine, self.choices = engine, choices
        self._arrived = asyncio.Event()  # set when any choice's channel gets events (the `async for` reader waits on it)
        self._listener: Callable[[bool], None] | None = None
        for choice in choices:
            choice.channel = Channel(on_done, self._notify)
        streams = engine.submit_all([(choice.request, choice.channel) for choice in choices], client)
        for choice, stream in zip(choices, streams):
            choice.stream = stream

    def listen(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(ended)` on the event loop, at once, whenever a choice's channel gets events (ended:
        its Done among them), for a writer that takes them by callbacks (`sse.EventStream`), instead of
        waking an `async for` reader."""
        self._listener = listener

    def _notify(self, ended: bool) -> None:
        if self._listener is not None:
            self._listener(ended)
        else:
            self._arrived.set()

    @property
    def ended(self) -> bool:
        """Every choice's Done has been taken."""
        return all(c.done is not None for c in self.choices)

    def end_waiting(self) -> bool:
        """A choice's Done has arrived and is not yet taken (its last characters should go out at once)."""
        return any(c.channel.ended and c.done is None for c in self.choices)

    def take(self) -> list[tuple[Choice, list]]:
        """What has arrived since the last take: (choice, its new events) in choice order, for each choice not
        yet done that has some (maybe none). A choice whose Done is taken is done."""
        round_ = [(c, events) for c in self.choices if c.done is None and (events := c.channel.take())]
        for choice, events in round_:
            if isinstance(events[-1], Done):  # a stream's Done is its last event
                choice.done = events[-1]
        return round_

    async def __aiter__(self) -> AsyncIterator[list[tuple[Choice, list]]]:
        """Rounds (`take`) until every choice has its Done, waiting while nothing has arrived."""
        while not self.ended:
            round_ = self.take()
            if not round_:
                self._arrived.clear()  # nothing has arrived: no await between this check and the wait
                await self._arrived.wait()
                continue
            yield round_

    async def all(self, request: Request) -> list[Done]:
        """Every choice's Done; a client that leaves first cancels them all (499)."""

        async def collect():
            async with contextlib.aclosing(self.__aiter__()) as rounds:
                async for _ in rounds:
                    pass

        finished, _ = await until_client_leaves(request, collect(), self.cancel)
        if not finished or not all(c.done for c in self.choices):
            raise APIError(499, "client_closed", "the client closed the connection")
        return [c.done for c in self.choices]

    def cancel(self) -> None:
        """Free the rows of every choice still running, at the engine's next step."""
        for choice in self.choices:
            if choice.stream is not None and choice.done is None:
                self.engine.cancel(choice.stream)


async def run_one(engine: Engine, gen: GenerationRequest, request: Request,
                  on_done: Callable[[Done], Awaitable[Done]] | None = None) -> Done:
    """A single stream to its end (a session's priming, a score): its Done."""
    return (await Responses(engine, [Choice(0, "", True, gen)], client_of(request), on_done).all(request))[0]
