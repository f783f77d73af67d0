"""The one Server-Sent Events writer, for every protocol: a protocol gives a formatter, this writes.

The writer reads the request's choices (`reader.Responses`) round by round and asks the formatter what
each choice's new events look like on its wire. Characters made within one interval share a message,
and a round's messages share one write (the last characters and the end go out together), which keeps
the cost per character low when many streams run; the first go out at once. The stream
always ends: after the formatter's closing messages, or after the messages it gives for a fault, and
whatever is still running is cancelled when the client goes away.

`EventStream` is the response: the messages are written by the request's own task, and one helper task
watches for the client going away and keeps an idle stream alive with a comment every `ping_s`. It
replaced sse-starlette's EventSourceResponse, whose task group (four tasks a response) and cancel scope
around every message cost the event loop more than the messages themselves (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .reader import Choice, Responses

PING_S = 15.0  # an idle stream (a long queue, a long prompt) gets a comment this often, so proxies keep it open
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode(message: dict, sep: str) -> bytes:
    """One SSE message ({"event"?, "data"?, "id"?, "comment"?}) in the wire format, fields in the usual order."""
    out = []
    if (comment := message.get("comment")) is not None:
        out.extend(f": {line}{sep}" for line in _LINE_BREAK.split(str(comment)))
    if (id_ := message.get("id")) is not None:
        out.append(f"id: {_LINE_BREAK.sub('', str(id_))}{sep}")
    if (event := message.get("event")) is not None:
        out.append(f"event: {_LINE_BREAK.sub('', event)}{sep}")
    if (data := message.get("data")) is not None:
        out.extend(f"data: {line}{sep}" for line in _LINE_BREAK.split(str(data)))
    out.append(sep)
    return "".join(out).encode()


class EventStream(Response):
    """An SSE response written from an async iterator of rounds, each a list of messages written at once
    (see the module's docstring)."""

    media_type = "text/event-stream"

    def __init__(self, rounds: AsyncIterator[list[dict]], sep: str, headers: dict[str, str], ping_s: float = PING_S):
        self.rounds, self.sep, self.ping_s = rounds, sep, ping_s
        self.status_code, self.background, self.body = 200, None, b""
        fields = {"content-type": "text/event-stream; charset=utf-8", "connection": "keep-alive",
                  **{k.lower(): v for k, v in headers.items()}}
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer, last = asyncio.current_task(), [time.monotonic()]
        gone = [False]  # the client went away: the writer was cancelled on purpose

        async def watch() -> None:
            """Cancel the writer when the client goes away; ping while the stream is idle."""
            message = asyncio.ensure_future(receive())
            try:
                while True:
                    done, _ = await asyncio.wait({message}, timeout=self.ping_s)
                    if done:
                        if message.result()["type"] == "http.disconnect":
                            gone[0] = True
                            writer.cancel()
                            return
                        message = asyncio.ensure_future(receive())
                    elif time.monotonic() - last[0] >= self.ping_s:
                        last[0] = time.monotonic()
                        await send({"type": "http.response.body", "body": encode({"comment": "ping"}, self.sep),
                                    "more_body": True})
            finally:
                message.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            sep = self.sep
            async with contextlib.aclosing(self.rounds) as rounds:
                async for messages in rounds:
                    body = encode(messages[0], sep) if len(messages) == 1 else b"".join(encode(m, sep) for m in messages)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    last[0] = time.monotonic()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone[0]:
                raise  # cancelled from outside (the server is stopping)
            writer.uncancel()  # the client left: the stream ends quietly, as any ended stream
        finally:
            watcher.cancel()


class StreamFormatter(Protocol):
    sep: str  # the line separator of this protocol's events
    failed: bool  # set by `events` when a choice's end was a fault: the stream ends after its messages

    def opening(self) -> Iterable[dict]: ...

    def events(self, choice: Choice, events: list) -> Iterable[dict]: ...

    def closing(self) -> Iterable[dict]: ...


def event_stream(responses: Responses, formatter: StreamFormatter, interval_s: float) -> EventStream:
    async def rounds():
        try:
            if opening := list(formatter.opening()):
                yield opening
            async with contextlib.aclosing(responses.__aiter__()) as rounds_:
                async for round_ in rounds_:
                    messages = []
                    for choice, events in round_:
                        messages.extend(formatter.events(choice, events))
                        if formatter.failed:
                            break
                    ended = formatter.failed or all(c.done for c in responses.choices)
                    if ended and not formatter.failed:  # a fault's messages end the stream; else the closing follows
                        messages.extend(formatter.closing())  # the last characters, the ends and the closing: one write
                    if messages:
                        yield messages
                    if ended:
                        return
                    if interval_s:
                        await responses.pause(interval_s)  # let the next characters gather (an end cuts it short)
            if closing := list(formatter.closing()):  # a request with no choice left to read
                yield closing
        finally:
            responses.cancel()  # the client went away, or a choice failed: free the rows at the next step

    return EventStream(rounds(), formatter.sep, {"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
