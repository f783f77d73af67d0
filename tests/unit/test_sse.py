"""The SSE response (service/api/sse.py): sse-starlette's wire format, a ping while idle, a quiet end when
the client leaves (the messages' generator is closed, so the request's rows are freed), an error that is
not the client's goes on up, and a stream's end is written as it arrives, whatever the writer's interval."""

from __future__ import annotations

import asyncio
import json

import pytest
from sse_starlette.event import ServerSentEvent

from service.api.bridge import make_deliver
from service.api.native.formatter import NativeStream
from service.api.reader import Choice, Responses
from service.api.sse import EventStream, encode, event_stream
from service.backends.torch_fp32 import TorchBackend
from service.engine.engine import Engine, EngineConfig
from service.engine.types import ANONYMOUS, GenerationRequest


@pytest.mark.parametrize("message", [
    {"event": "token", "data": '{"index": 0, "text": "ROMEO"}'},
    {"data": "[DONE]"},
    {"data": "two\nlines\r\nand\rthree"},
    {"comment": "ping"},
    {"id": "7", "event": "done", "data": "{}"},
])
@pytest.mark.parametrize("sep", ["\r\n", "\n"])
def test_messages_are_written_as_sse_starlette_writes_them(message, sep):
    assert encode(message, sep) == ServerSentEvent(**message, sep=sep).encode()


class Client:
    """The ASGI side of one connection: what was sent, and a disconnect to give when told."""

    def __init__(self):
        self.sent: list[dict] = []
        self.leave = asyncio.Event()
        self.changed = asyncio.Condition()  # notified on every send

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        async with self.changed:
            self.changed.notify_all()

    async def until(self, predicate) -> None:
        """Wait for what was sent to satisfy `predicate` (10 s at most)."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), 10)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def test_an_idle_stream_is_pinged_then_written_and_ended():
    async def scenario():
        client, go = Client(), asyncio.Event()

        async def messages():
            await go.wait()
            yield [{"event": "token", "data": "x"}]

        response = EventStream(messages(), "\r\n", {"Cache-Control": "no-store"}, ping_s=0.05)
        task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
        await client.until(lambda: any(b.startswith(b": ping") for b in client.bodies()))
        go.set()
        await asyncio.wait_for(task, 10)
        return client

    client = asyncio.run(scenario())
    start = client.sent[0]
    assert start["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"cache-control", b"no-store") in start["headers"]
    bodies = client.bodies()
    assert bodies[0] == b": ping\r\n\r\n" and bodies[-2] == b"event: token\r\ndata: x\r\n\r\n" and bodies[-1] == b""
    assert client.sent[-1]["more_body"] is False


def test_a_client_that_leaves_ends_the_stream_quietly_and_closes_its_messages():
    async def scenario():
        client, closed = Client(), asyncio.Event()

        async def messages():
            try:
                yield [{"data": "first"}]
                await asyncio.Event().wait()  # a stream that would run for ever
            finally:
                closed.set()

        response = EventStream(messages(), "\n", {})
        task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
        await client.until(lambda: len(client.bodies()) >= 1)
        client.leave.set()
        await asyncio.wait_for(task, 10)  # returns: no CancelledError escapes to the server
        return client, closed.is_set(), task

    client, closed, task = asyncio.run(scenario())
    assert closed and not task.cancelled() and client.bodies() == [b"data: first\n\n"]


def test_a_cancellation_from_outside_is_not_taken_for_a_client_leaving():
    async def scenario():
        client = Client()

        async def messages():
            await asyncio.Event().wait()
            yield [{}]

        task = asyncio.create_task(EventStream(messages(), "\n", {})({"type": "http"}, client.receive, client.send))
        await client.until(lambda: bool(client.sent))
        task.cancel()  # the server stopping
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_streams_end_cuts_the_writers_pause_short(tiny_model):
    """The writer pauses between rounds so characters gather, but an end goes out when it arrives: with
    an interval of an hour, a stream of a real engine still ends as soon as its last character is made."""
    async def scenario():
        engine = Engine(TorchBackend(tiny_model.model), tiny_model.vocab, EngineConfig(max_batch_size=4),
                        make_deliver(asyncio.get_running_loop()))
        engine.start()
        try:
            request = GenerationRequest(prompt_ids=[1, 2], max_new_tokens=300, seed=5)
            responses = Responses(engine, [Choice(0, "", True, request)], ANONYMOUS)
            client = Client()
            stream = event_stream(responses, NativeStream("tiny"), interval_s=3600.0)
            await asyncio.wait_for(stream({"type": "http"}, client.receive, client.send), 30)
        finally:
            engine.stop()
        body = b"".join(client.bodies()).decode()
        assert "event: done" in body and body.count("event: token") >= 1
        texts = [line for line in body.split("\r\n") if line.startswith("data: {\"index\"")]
        assert sum(len(json.loads(t[len("data: "):])["text"]) for t in texts) == 300

    asyncio.run(scenario())
