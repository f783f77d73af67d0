"""The edge's body writer (service/api/edge.py) on the uvicorn this project pins: it is offered (not for HEAD), it frames
a chunk as uvicorn's own `send` does, and it says "not now" before the response starts, while the client
is not reading and after the end; a client that is gone gets nothing written."""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from service.api.edge import body_writer

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


class Transport:
    """What was written to the connection."""

    def __init__(self):
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def cycle(transport: Transport, method: str = "POST") -> RequestResponseCycle:
    """A request's cycle as uvicorn's httptools protocol makes one."""
    scope = {"type": "http", "method": method, "path": "/generate", "http_version": "1.1", "headers": []}
    log = logging.getLogger("test")
    return RequestResponseCycle(scope=scope, transport=transport, flow=FlowControl(transport), logger=log,
                                access_logger=log, access_log=False, default_headers=[], message_event=asyncio.Event(),
                                expect_100_continue=False, keep_alive=True, on_response=lambda: None)


def test_a_chunk_is_written_as_uvicorns_send_writes_it():
    async def scenario():
        direct, through_send = Transport(), Transport()
        mine, theirs = cycle(direct), cycle(through_send)
        write = body_writer(mine)
        assert write is not None  # offered on this uvicorn
        assert body_writer(cycle(Transport(), "HEAD")) is None  # a HEAD answer has no body to write
        assert write(b"early") is False and direct.written == []  # no response yet: send must start it
        await mine.send(START)
        await theirs.send(START)
        for body in (b"event: token\r\ndata: {\"index\": 0, \"text\": \"ab\"}\r\n\r\n", "é".encode() * 300):
            assert write(body) is True
            await theirs.send({"type": "http.response.body", "body": body, "more_body": True})
        await mine.send({"type": "http.response.body", "body": b"", "more_body": False})
        await theirs.send({"type": "http.response.body", "body": b"", "more_body": False})
        assert b"".join(direct.written) == b"".join(through_send.written)
        assert write(b"late") is False  # the response is complete

    asyncio.run(scenario())


def test_not_now_while_the_client_is_not_reading_and_nothing_once_it_is_gone():
    async def scenario():
        transport = Transport()
        c = cycle(transport)
        write = body_writer(c)
        await c.send(START)
        before = len(transport.written)
        c.flow.pause_writing()  # the transport's buffer is full
        assert write(b"x") is False and len(transport.written) == before
        c.flow.resume_writing()
        assert write(b"x") is True and transport.written[-1] == b"1\r\nx\r\n"
        c.disconnected = True
        assert write(b"y") is True and transport.written[-1] == b"1\r\nx\r\n"  # dropped, as uvicorn's send drops it

    asyncio.run(scenario())
