"""The one Server-Sent Events writer, for every protocol: a protocol gives a formatter, this writes.

The writer takes the request's choices' events (`reader.Responses`) as they arrive and asks the
formatter what each choice's new events look like on its wire. Characters made within one interval
share a message, and what is written at once shares one write (the last characters and the end go out
together), which keeps the cost per character low when many streams run; the first go out at once. The
stream always ends: after the formatter's closing messages, or after the messages it gives for a fault,
and whatever is still running is cancelled when the client goes away.

`EventStream` is the response. Its writes are made by callbacks on the event loop, when events arrive
or when an interval's timer ends, straight to the connection through the edge's body writer (`edge.
BODY_WRITER`): no task wakes, and no message passes the middlewares' `send` wrappers, for a stream's
characters (a message cost about 45 us of the event loop's CPU through the request's task and `send`).
The request's task sends only what the connection cannot take yet (a client that is not reading, or an
ASGI server without that writer), in order, and the stream's end. One helper task watches for the
client going away and keeps an idle stream alive with a comment every `ping_s`. It replaced
sse-starlette's EventSourceResponse, whose task group (four tasks a response) and cancel scope around
every message cost the event loop more than the messages themselves (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .edge import BODY_WRITER
from .reader import Choice, Responses

PING_S = 15.0  # an idle stream (a long queue, a long prompt) gets a comment this often, so proxies keep it open
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


# The protocols' JSON in SSE messages: one encoder, made once (json.dumps with any keyword makes a new one a call).
dumps = json.JSONEncoder(ensure_ascii=False).encode


def encode(message: dict, sep: str) -> bytes:
    """One SSE message ({"event"?, "data"?, "id"?, "comment"?}) in the wire format, fields in the usual order."""
    event, data = message.get("event"), message.get("data")
    if len(message) == (event is not None) + (data is not None) and _one_line(event) and _one_line(data):
        # a stream's usual message (an event of one line of JSON): no line to split
        return f"event: {event}{sep}data: {data}{sep}{sep}".encode() if event is not None else f"data: {data}{sep}{sep}".encode()
    out = []
    if (comment := message.get("comment")) is not None:
        out.extend(f": {line}{sep}" for line in _LINE_BREAK.split(str(comment)))
    if (id_ := message.get("id")) is not None:
        out.append(f"id: {_LINE_BREAK.sub('', str(id_))}{sep}")
    if event is not None:
        out.append(f"event: {_LINE_BREAK.sub('', event)}{sep}")
    if data is not None:
        out.extend(f"data: {line}{sep}" for line in _LINE_BREAK.split(str(data)))
    out.append(sep)
    return "".join(out).encode()


def _one_line(field) -> bool:
    return field is None or (type(field) is str and "\n" not in field and "\r" not in field)


class EventStream(Response):
    """An SSE response: a formatter's messages for a request's choices, written as their events arrive (see
    the module's docstring)."""

    media_type = "text/event-stream"

    def __init__(self, responses: Responses, formatter: StreamFormatter, interval_s: float, headers: dict[str, str],
                 ping_s: float = PING_S):
        self.responses, self.formatter, self.interval_s, self.ping_s = responses, formatter, interval_s, ping_s
        self.status_code, self.background, self.body = 200, None, b""
        fields = {"content-type": "text/event-stream; charset=utf-8", "connection": "keep-alive",
                  **{k.lower(): v for k, v in headers.items()}}
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        writer = _Writer(self.responses, self.formatter, self.interval_s, send, scope.get("extensions", {}).get(BODY_WRITER))
        gone = [False]  # the client went away: the request's task was cancelled on purpose

        async def watch() -> None:
            """Cancel the request's task when the client goes away; ping while the stream is idle."""
            message = asyncio.ensure_future(receive())
            try:
                while True:
                    done, _ = await asyncio.wait({message}, timeout=self.ping_s)
                    if done:
                        if message.result()["type"] == "http.disconnect":
                            gone[0] = True
                            task.cancel()
                            return
                        message = asyncio.ensure_future(receive())
                    elif writer.loop.time() - writer.written_at >= self.ping_s:
                        writer.write(encode({"comment": "ping"}, self.formatter.sep))
            finally:
                message.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if opening := list(self.formatter.opening()):
                writer.write(b"".join(encode(m, self.formatter.sep) for m in opening))
            if not self.responses.choices:  # a request with no choice to read: the closing alone
                writer.flush()
            else:
                self.responses.listen(writer.arrived)
                writer.arrived(self.responses.end_waiting())  # what came before
            await writer.run()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone[0]:
                raise  # cancelled from outside (the server is stopping)
            task.uncancel()  # the client left: the stream ends quietly, as any ended stream
        finally:
            writer.close()
            watcher.cancel()
            self.responses.cancel()  # the client went away, or a choice failed: free the rows at the next step


class _Writer:
    """One stream's writes, driven by callbacks on the event loop: the engine's events for the request
    arrive (`arrived`), and its characters go out when `interval_s` has passed since the last write (a
    timer, armed once, waits for the rest of it), at once for the first characters and for an end.

    A write goes straight to the connection through the edge's body writer (`BODY_WRITER`) when it can,
    with no task to wake; else (no such writer, or a client that is not reading) it waits in `outbox`,
    and the request's task sends it through the ASGI `send`, in order, in `run`."""

    def __init__(self, responses: Responses, formatter: StreamFormatter, interval_s: float, send: Send,
                 direct: Callable[[bytes], bool] | None):
        self.responses, self.formatter, self.interval_s, self.send, self.direct = responses, formatter, interval_s, send, direct
        self.loop = asyncio.get_running_loop()
        self.flushed_at = -math.inf  # loop time of the last characters' write: the first go out at once
        self.written_at = self.loop.time()  # of any write (a ping included): an idle stream is pinged
        self.timer: asyncio.TimerHandle | None = None
        self.outbox: collections.deque[bytes] = collections.deque()
        self.sending = False  # the request's task is sending from the outbox: later writes queue behind it
        self.wake: asyncio.Future | None = None  # the request's task waits on it for the outbox or the end
        self.over = False  # the last messages are written (or queued): nothing more comes
        self.error: Exception | None = None  # what failed in a callback: `run` raises it

    def arrived(self, ended: bool) -> None:
        """A choice's channel got events (ended: its Done among them: the last characters go out at once)."""
        if self.over:
            return
        if ended or self.loop.time() - self.flushed_at >= self.interval_s:
            self.flush()
        elif self.timer is None:
            self.timer = self.loop.call_at(self.flushed_at + self.interval_s, self.flush)

    def flush(self) -> None:
        """Write everything that has arrived as one write: the choices' new messages, and after the last
        end the closing (or after a fault's messages, nothing more). It runs in callbacks, so a failure is
        kept for the request's task to raise (`run`)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.over:
            return
        try:
            self._flush()
        except Exception as e:
            self.error, self.over = e, True
            self._wake()

    def _flush(self) -> None:
        formatter, messages = self.formatter, []
        for choice, events in self.responses.take():
            messages.extend(formatter.events(choice, events))
            if formatter.failed:
                break
        ended = formatter.failed or self.responses.ended
        if ended and not formatter.failed:  # a fault's messages end the stream; else the closing follows
            messages.extend(formatter.closing())  # the last characters, the ends and the closing: one write
        if messages:
            sep = formatter.sep
            self.flushed_at = self.loop.time()
            self.write(encode(messages[0], sep) if len(messages) == 1 else b"".join(encode(m, sep) for m in messages))
        if ended:
            self.over = True
            self._wake()

    def write(self, body: bytes) -> None:
        self.written_at = self.loop.time()
        if not self.outbox and not self.sending and self.direct is not None and self.direct(body):
            return
        self.outbox.append(body)
        self._wake()

    def _wake(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    async def run(self) -> None:
        """The request's task: send what waits in the outbox, until the last messages are out."""
        while True:
            while self.outbox:
                self.sending = True
                try:
                    await self.send({"type": "http.response.body", "body": self.outbox.popleft(), "more_body": True})
                finally:
                    self.sending = False
            if self.error is not None:
                raise self.error
            if self.over:
                return
            self.wake = self.loop.create_future()
            await self.wake

    def close(self) -> None:
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class StreamFormatter(Protocol):
    sep: str  # the line separator of this protocol's events
    failed: bool  # set by `events` when a choice's end was a fault: the stream ends after its messages

    def opening(self) -> Iterable[dict]: ...

    def events(self, choice: Choice, events: list) -> Iterable[dict]: ...

    def closing(self) -> Iterable[dict]: ...


def event_stream(responses: Responses, formatter: StreamFormatter, interval_s: float) -> EventStream:
    return EventStream(responses, formatter, interval_s, {"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
