"""The one reader of engine events, for every protocol (llama.cpp's server has one response reader too).

A request is one or more choices (OpenAI's `n` and list prompts; a native call is one). `Responses`
submits them to the engine together, then hands their events back as they arrive (`async for`), or
waits for every choice's end (`all`), and cancels whatever is still running when the reader stops.
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
        self._wakeup = asyncio.Event()  # set when any choice's channel gets events
        self._pause: asyncio.Future | None = None  # the reader's pause between rounds (`pause`), while it lasts
        for choice in choices:
            choice.channel = Channel(on_done, self._wakeup, self._end_arrived)
        streams = engine.submit_all([(choice.request, choice.channel) for choice in choices], client)
        for choice, stream in zip(choices, streams):
            choice.stream = stream

    async def __aiter__(self) -> AsyncIterator[list[tuple[Choice, list]]]:
        """Rounds of (choice, its new events), in choice order, until every choice has its Done. A round
        holds everything that arrived since the last one was taken: a reader that pauses between rounds
        (the SSE writer's interval) gets the characters of the pause together."""
        while True:
            open_ = [c for c in self.choices if c.done is None]
            if not open_:
                return
            round_ = [(c, events) for c in open_ if (events := c.channel.take())]
            if not round_:
                self._wakeup.clear()  # nothing has arrived: no await between this check and the wait
                await self._wakeup.wait()
                continue
            for choice, events in round_:
                for event in events:
                    if isinstance(event, Done):
                        choice.done = event
            yield round_

    async def pause(self, seconds: float) -> None:
        """Let the next characters gather for `seconds`, or less: a choice's end ends the pause (the last
        characters and the end go out at once), and so does one that came before the pause."""
        if any(c.channel.ended and c.done is None for c in self.choices):
            return
        loop = asyncio.get_running_loop()
        self._pause = pause = loop.create_future()
        timer = loop.call_later(seconds, _settle, pause)
        try:
            await pause
        finally:
            timer.cancel()
            self._pause = None

    def _end_arrived(self) -> None:
        if self._pause is not None:
            _settle(self._pause)

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


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def run_one(engine: Engine, gen: GenerationRequest, request: Request,
                  on_done: Callable[[Done], Awaitable[Done]] | None = None) -> Done:
    """A single stream to its end (a session's priming, a score): its Done."""
    return (await Responses(engine, [Choice(0, "", True, gen)], client_of(request), on_done).all(request))[0]
