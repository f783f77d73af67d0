"""The SSE response (service/api/sse.py): sse-starlette's wire format, a ping while idle, a quiet end when
the client leaves (the request's rows are freed), a cancellation that is not the client's goes on up, the
edge's direct writes and `send` in one order, a fault in the writer's callbacks ends the stream, and a
stream's end is written as it arrives, whatever the writer's interval."""

from __future__ import annotations

import asyncio
import json

import pytest
from sse_starlette.event import ServerSentEvent

from service.api.bridge import make_deliver
from service.api.native.formatter import NativeStream
from service.api.reader import Choice, Responses
from service.api.edge import BODY_WRITER
from service.api.sse import EventStream, encode, event_stream
from service.backends.torch_fp32 import TorchBackend
from service.engine.engine import Engine, EngineConfig
from service.engine.types import ANONYMOUS, Done, GenerationRequest, Token


@pytest.mark.parametrize("message", [
    {"event": "token", "data": '{"index": 0, "text": "ROMEO"}'},
    {"data": "[DONE]"},
    {"data": "two\nlines\r\nand\rthree"},
    {"comment": "ping"},
    {"id": "7", "event": "done", "data": "{}"},
    {"event": "to\nken", "data": "x"},
    {"event": "token", "data": "one\rline"},
])
@pytest.mark.parametrize("sep", ["\r\n", "\n"])
def test_messages_are_written_as_sse_starlette_writes_them(message, sep):
    assert encode(message, sep) == ServerSentEvent(**message, sep=sep).encode()


class Client:
    """The ASGI side of one connection: what was sent, and a disconnect to give when told. With `hold`
    cleared, a body's send waits for it (a client that is not reading)."""

    def __init__(self, log: list | None = None):
        self.sent: list[dict] = []
        self.log = log if log is not None else []  # every body, in the order it was handed over, by either path
        self.leave = asyncio.Event()
        self.hold = asyncio.Event()
        self.hold.set()
        self.entered = asyncio.Event()  # set when a body's send begins
        self.changed = asyncio.Condition()  # notified on every send

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.body":
            self.log.append(("send", message["body"]))
            self.entered.set()
            await self.hold.wait()
        self.sent.append(message)
        async with self.changed:
            self.changed.notify_all()

    async def until(self, predicate) -> None:
        """Wait for what was sent to satisfy `predicate` (10 s at most)."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), 10)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


class FakeEngine:
    """Takes one request's streams and records which were cancelled; the test pushes their events."""

    def __init__(self):
        self.cancelled: list = []

    def submit_all(self, requests, client):
        return [object() for _ in requests]

    def cancel(self, stream) -> None:
        self.cancelled.append(stream)


def one_choice(engine: FakeEngine) -> tuple[Responses, Choice]:
    choice = Choice(0, "", True, GenerationRequest(prompt_ids=[1], max_new_tokens=10))
    return Responses(engine, [choice], ANONYMOUS), choice


def done(n: int) -> Done:
    return Done("x" * n, "length", 1, n, 0)


async def started(client: Client, responses: Responses, formatter=None, scope: dict | None = None) -> asyncio.Task:
    """The response's task, once it has sent its start (no interval: every arrival is written)."""
    response = EventStream(responses, formatter or NativeStream("m"), 0.0, {})
    task = asyncio.create_task(response(scope or {"type": "http"}, client.receive, client.send))
    await client.until(lambda: bool(client.sent))
    return task


def test_an_idle_stream_is_pinged_then_written_and_ended():
    async def scenario():
        client = Client()
        responses, choice = one_choice(FakeEngine())
        response = EventStream(responses, NativeStream("m"), 0.02, {"Cache-Control": "no-store"}, ping_s=0.05)
        task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
        await client.until(lambda: any(b.startswith(b": ping") for b in client.bodies()))
        choice.channel.push([Token(0, "ab"), done(2)])
        await asyncio.wait_for(task, 10)
        return client

    client = asyncio.run(scenario())
    start = client.sent[0]
    assert start["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"cache-control", b"no-store") in start["headers"]
    bodies = client.bodies()
    assert bodies[0] == b": ping\r\n\r\n" and bodies[-1] == b""
    assert bodies[-2].startswith(b'event: token\r\ndata: {"index": 0, "text": "ab"}\r\n\r\nevent: done\r\n')  # one write
    assert client.sent[-1]["more_body"] is False


def test_a_client_that_leaves_ends_the_stream_quietly_and_frees_its_rows():
    async def scenario():
        client, engine = Client(), FakeEngine()
        responses, choice = one_choice(engine)
        task = await started(client, responses)
        choice.channel.push([Token(0, "first")])
        await client.until(lambda: len(client.bodies()) >= 1)
        client.leave.set()
        await asyncio.wait_for(task, 10)  # returns: no CancelledError escapes to the server
        return client, engine, choice, task

    client, engine, choice, task = asyncio.run(scenario())
    assert not task.cancelled() and engine.cancelled == [choice.stream]
    assert client.bodies() == [b'event: token\r\ndata: {"index": 0, "text": "first"}\r\n\r\n']


def test_a_cancellation_from_outside_is_not_taken_for_a_client_leaving():
    async def scenario():
        client = Client()
        responses, _ = one_choice(FakeEngine())
        task = await started(client, responses)
        task.cancel()  # the server stopping
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_direct_writes_and_sends_keep_the_order_of_the_messages():
    """The edge's body writer takes a write at once, or refuses it (a client that is not reading): then it
    goes through `send`, and every later write queues behind it, even once the writer would take it again."""
    async def scenario():
        log: list = []
        client = Client(log)
        taking, written = [True], asyncio.Event()

        def direct(body: bytes) -> bool:
            if taking[0]:
                log.append(("direct", body))
                written.set()
            return taking[0]

        responses, choice = one_choice(FakeEngine())
        task = await started(client, responses, scope={"type": "http", "extensions": {BODY_WRITER: direct}})
        choice.channel.push([Token(0, "a")])  # written at once
        await written.wait()
        taking[0] = False
        client.hold.clear()
        client.entered.clear()
        choice.channel.push([Token(1, "b")])  # refused: sent by the request's task, which waits for the client
        await client.entered.wait()
        taking[0] = True
        choice.channel.push([Token(2, "c")])  # the writer would take it, but "b" is not out yet: it queues
        choice.channel.push([Token(3, "d"), done(4)])
        client.hold.set()
        await asyncio.wait_for(task, 10)
        return log

    log = asyncio.run(scenario())
    texts = [json.loads(line[len(b"data: "):])["text"] for _, body in log for line in body.split(b"\r\n")
             if line.startswith(b'data: {"index"')]
    assert texts == ["a", "b", "c", "d"]
    assert [path for path, _ in log] == ["direct", "send", "send", "send", "send"]  # the last: the empty end
    assert log[-1] == ("send", b"")


def test_a_fault_in_a_callback_ends_the_stream_with_that_error():
    """The writer formats in the event loop's callbacks: what fails there is raised by the request's task
    (which ends the response) instead of leaving a stream that never ends."""
    class Broken(NativeStream):
        def events(self, choice, events):
            raise RuntimeError("formatter broke")

    async def scenario():
        client, engine = Client(), FakeEngine()
        responses, choice = one_choice(engine)
        task = await started(client, responses, Broken("m"))
        choice.channel.push([Token(0, "a")])
        with pytest.raises(RuntimeError, match="formatter broke"):
            await asyncio.wait_for(task, 10)
        assert engine.cancelled == [choice.stream]

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
