"""The one Server-Sent Events writer, for every protocol: a protocol gives a formatter, this writes.

The writer reads the request's choices (`reader.Responses`) round by round and asks the formatter what
each choice's new events look like on its wire. Characters made within one interval share a message,
which keeps the cost per character low when many streams run; the first go out at once. The stream
always ends: after the formatter's closing messages, or after the messages it gives for a fault, and
whatever is still running is cancelled when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Protocol

from sse_starlette import EventSourceResponse

from .reader import Choice, Responses


class StreamFormatter(Protocol):
    sep: str  # the line separator of this protocol's events
    failed: bool  # set by `events` when a choice's end was a fault: the stream ends after its messages

    def opening(self) -> Iterable[dict]: ...

    def events(self, choice: Choice, events: list) -> Iterable[dict]: ...

    def closing(self) -> Iterable[dict]: ...


def event_stream(responses: Responses, formatter: StreamFormatter, interval_s: float) -> EventSourceResponse:
    async def messages():
        try:
            for message in formatter.opening():
                yield message
            async with contextlib.aclosing(responses.__aiter__()) as rounds:
                async for round_ in rounds:
                    for choice, events in round_:
                        for message in formatter.events(choice, events):
                            yield message
                        if formatter.failed:
                            return
                    if interval_s and not all(c.done for c in responses.choices):
                        await asyncio.sleep(interval_s)  # let the next characters gather
            for message in formatter.closing():
                yield message
        finally:
            responses.cancel()  # the client went away, or a choice failed: free the rows at the next step

    return EventSourceResponse(messages(), ping=15, sep=formatter.sep,
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
