"""The HTTP edge: bounds on what one connection may hold, as nginx's client_header_* and send_timeout set.

uvicorn bounds idle keep-alive time (`timeout_keep_alive`), but with its httptools parser nothing bounds a request's header size (8 MiB of headers were answered
200), and no timer runs while a request's head or body trickles in, or while a response waits for a
client that reads nothing (100 connections that sent half a request line were still open after 30 s).
`edge_protocol` adds those bounds to uvicorn's own protocol class:

- the request line and headers: at most `max_header_bytes` (then 431), within `header_timeout_s` of the
  connection's start or the request's first byte (then 408); the connection closes either way;
- the body: within `body_timeout_s` once the headers are in (then the connection closes, and the app
  sees the client gone);
- a response that cannot be written for `send_timeout_s` (the client reads nothing) aborts the connection;
- a request on a connection beyond `max_connections` open ones gets 503 (with Retry-After) in the error
  shape of its route, as uvicorn's `limit_concurrency` would, but in JSON; the header timeout then
  bounds how long such connections stay.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..settings import Settings
from .errors import error_body, error_content

log = logging.getLogger("charlstm.api")

# The ASGI scope extension under which the edge offers a streaming response a synchronous write of its next
# body chunk: `write(body) -> bool`. The SSE writer (sse.py) writes a stream's characters from the event
# loop's callbacks with it, with no task to wake and no `send` through every middleware; False means "not
# now" (the client is not reading, or the response is not streaming yet): the caller then awaits `send`.
BODY_WRITER = "charlstm.body_writer"


_CYCLE_FIELDS = ("disconnected", "response_started", "response_complete", "flow", "scope", "chunked_encoding", "transport")


def body_writer(cycle: RequestResponseCycle) -> Callable[[bytes], bool] | None:
    """The body writer of one request's response (uvicorn's cycle): a chunk framed and written as
    `cycle.send` would, while the response is started and not complete, and the transport takes more.
    None where the cycle lacks a field it reads (another uvicorn), or for a HEAD request (no body is
    written): the stream then goes through `send`."""
    if not all(hasattr(cycle, name) for name in _CYCLE_FIELDS) or cycle.scope["method"] == "HEAD":
        return None

    def write(body: bytes) -> bool:
        if cycle.disconnected:
            return True  # as uvicorn's send: what a gone client would have read is dropped
        if not cycle.response_started or cycle.response_complete or cycle.flow.write_paused:
            return False
        cycle.transport.write(b"%x\r\n%s\r\n" % (len(body), body) if cycle.chunked_encoding else body)
        return True

    return write


def _response(status: int, reason: str, type_: str, message: str, path: str | None = None, extra: str = "") -> bytes:
    """A whole error response; `path` picks the route's error shape (None: the head was never read)."""
    content = error_body(type_, message) if path is None else error_content(path, status, type_, message)
    body = json.dumps(content).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n").encode()
    return head + body


def edge_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the settings' header, body and send bounds."""
    max_header_bytes, header_timeout = settings.max_header_bytes, settings.header_timeout_s
    body_timeout, send_timeout = settings.body_timeout_s, settings.send_timeout_s
    max_connections = settings.max_connections
    busy = f"the server holds max_connections={max_connections} connections; retry shortly"
    too_large = _response(431, "Request Header Fields Too Large", "headers_too_large",
                          f"the request line and headers are larger than max_header_bytes={max_header_bytes}")
    too_slow = _response(408, "Request Timeout", "request_timeout",
                         f"the request line and headers did not arrive within header_timeout_s={header_timeout:g}")

    class EdgeProtocol(HttpToolsProtocol):
        _in_head = True  # the parser is reading a request line and headers (or waits for one)
        _head_bytes = 0
        _timer: asyncio.TimerHandle | None = None  # the header or the body deadline
        _send_timer: asyncio.TimerHandle | None = None
        _parsed = 0  # bytes of the request line and headers the parser has handed over
        _rejected = False  # answered with an error: whatever else arrives is ignored

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout, self._head_too_slow)  # a connection that sends nothing is closed too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._send_timer is not None:
                self._send_timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._rejected:
                return
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > max_header_bytes:  # a head still coming in, already too large
                self._too_large()

        def on_url(self, url: bytes) -> None:
            self._parsed += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._parsed += len(name) + len(value) + 4
            super().on_header(name, value)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._timer is None:  # the first byte of a keep-alive connection's next request
                self._arm(header_timeout, self._head_too_slow)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes, parsed, self._parsed = False, 0, self._parsed, 0
            if parsed > max_header_bytes:  # the whole head came in one read
                self._too_large()
                return
            if len(self.connections) > max_connections or len(self.tasks) >= max_connections:
                path = self.url.partition(b"?")[0].decode("latin-1")
                log.warning("refusing a request: %d connections are open (max_connections=%d)", len(self.connections), max_connections)
                self._reject(_response(503, "Service Unavailable", "overloaded", busy, path, "retry-after: 1\r\n"))
                return
            self._arm(body_timeout, self._body_too_slow)
            super().on_headers_complete()
            if self.cycle is not None and self.cycle.scope is self.scope:  # an HTTP request (not an upgrade)
                if (write := body_writer(self.cycle)) is not None:
                    self.scope.setdefault("extensions", {})[BODY_WRITER] = write  # before its task starts

        def on_body(self, body: bytes) -> None:
            if not self._rejected:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._disarm()
            self._in_head = True
            if not self._rejected:
                super().on_message_complete()

        def pause_writing(self) -> None:  # the transport's buffer is full: the client is not reading
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(send_timeout, self._send_too_slow)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _arm(self, seconds: float, then) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, then)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _reject(self, response: bytes) -> None:
            self._disarm()
            self._rejected = True
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

        def _too_large(self) -> None:
            if not self._rejected:
                log.warning("closing a connection whose request head passed max_header_bytes=%d", max_header_bytes)
                self._reject(too_large)

        def _head_too_slow(self) -> None:
            self._timer = None
            if self._in_head and not self.transport.is_closing():
                if self._head_bytes:
                    log.warning("closing a connection whose request head took more than %gs", header_timeout)
                    self._reject(too_slow)
                else:  # it never began a request: nothing to answer
                    self.transport.close()

        def _body_too_slow(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                log.warning("closing a connection whose request body took more than %gs", body_timeout)
                self.transport.close()  # the app's receive() then says the client has gone

        def _send_too_slow(self) -> None:
            self._send_timer = None
            if not self.transport.is_closing():
                log.warning("aborting a connection that read nothing for %gs", send_timeout)
                self.transport.abort()  # close() would wait for a buffer that never drains

    return EdgeProtocol
