"""Every failure path ends the request and frees its place: faults injected into a real server.

Each test runs the service in this process (real uvicorn on loopback, real HTTP clients), breaks one
component, and checks that every client gets an end (503 `engine_error` in the error shape for a
plain request, an `error` event then `done` for a stream), that capacity returns to where it was, and
that the next request is served.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from service.sessions.memory_store import MemorySessionStore

from ..inproc import InProcessServer
from ..server import wait_until


def sse_events(url: str, body: dict) -> list[tuple[str, dict]]:
    """A streamed /generate, read to its end: [(event, data), ...]."""
    events, name = [], None
    with httpx.stream("POST", url, json=dict(body, stream=True), timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name:
                events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def assert_idle(srv: InProcessServer) -> None:
    """No place is held: nothing admitted, nothing running or waiting."""
    assert srv.engine.wait_idle(10)
    wait_until(lambda: srv.engine.snapshot().running == 0 and srv.engine.snapshot().waiting == 0, what="empty gauges")


def assert_served(srv: InProcessServer) -> None:
    r = httpx.post(srv.url + "/generate", json={"prompt": "KING:", "max_new_tokens": 20, "seed": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["text"]) == 20


def assert_engine_error(r: httpx.Response, type_: str = "engine_error") -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == type_ and r.json()["error"]["message"]
    assert r.headers.get("retry-after")


class Switch:
    """Fails the next `n` calls of whatever it wraps."""

    def __init__(self):
        self.n = 0

    def trip(self, what: str):
        if self.n > 0:
            self.n -= 1
            raise RuntimeError(f"injected fault in {what}")


def test_a_runner_fault_ends_the_streams_in_the_batch_and_serving_goes_on(tiny_model):
    switch = Switch()

    def hook(engine, loaded, store):
        real = engine.backend.start_step

        def start_step(ids, state, background=True):
            switch.trip("the step")
            return real(ids, state, background)

        engine.backend.start_step = start_step

    with InProcessServer(tiny_model, hooks=[hook]) as srv:
        switch.n = 1
        assert_engine_error(httpx.post(srv.url + "/generate", json={"max_new_tokens": 50}, timeout=60))
        assert_idle(srv)
        switch.n = 1
        events = sse_events(srv.url + "/generate", {"max_new_tokens": 50})
        assert [e for e, _ in events][-2:] == ["error", "done"]
        assert events[-2][1]["error"]["type"] == "engine_error" and events[-1][1]["finish_reason"] == "error"
        assert_idle(srv)
        assert_served(srv)


def test_an_observer_that_raises_costs_nothing(tiny_model):
    class Broken:
        def __getattr__(self, name):
            def fail(*args):
                raise RuntimeError(f"injected fault in observer {name}")
            return fail

    with InProcessServer(tiny_model, hooks=[lambda engine, loaded, store: engine.add_observer(Broken())]) as srv:
        assert_served(srv)
        assert [e for e, _ in sse_events(srv.url + "/generate", {"max_new_tokens": 30})][-1] == "done"
        assert httpx.post(srv.url + "/sessions", json={"prompt": "KING:"}, timeout=60).status_code == 201
        assert_idle(srv)


def test_a_delivery_that_raises_still_reaches_every_client(tiny_model):
    calls = {"n": 0}

    def hook(engine, loaded, store):
        real = engine.deliver

        def deliver(batch):
            calls["n"] += 1
            if calls["n"] % 2:  # every other hand-over fails outright
                raise RuntimeError("injected fault in delivery")
            real(batch)

        engine.deliver = deliver

    with InProcessServer(tiny_model, hooks=[hook]) as srv:
        body = {"prompt": "QUEEN:", "max_new_tokens": 40, "seed": 8}

        async def crowd():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(srv.url + "/generate", json=dict(body, seed=i)) for i in range(8)))

        for r in asyncio.run(crowd()):
            assert r.status_code == 200 and len(r.json()["text"]) == 40
        events = sse_events(srv.url + "/generate", body)
        assert events[-1][0] == "done" and "".join(d["text"] for e, d in events if e == "token") == \
            httpx.post(srv.url + "/generate", json=body, timeout=60).json()["text"]
        assert calls["n"] > 2
        assert_idle(srv)


def test_a_fault_while_finishing_a_stream_still_ends_it(tiny_model):
    switch = Switch()

    def hook(engine, loaded, store):
        real = engine.output._done

        def done(*args):
            switch.trip("building Done")
            return real(*args)

        engine.output._done = done

    with InProcessServer(tiny_model, hooks=[hook], max_batch_size=1, max_queue=0) as srv:
        for _ in range(3):  # repeated failures never eat the capacity (max_batch_size 1, no queue)
            switch.n = 1
            assert_engine_error(httpx.post(srv.url + "/generate", json={"max_new_tokens": 5}, timeout=60))
        switch.n = 1
        assert [e for e, _ in sse_events(srv.url + "/generate", {"max_new_tokens": 5})][-2:] == ["error", "done"]
        assert_idle(srv)
        assert_served(srv)


class FlakyStore(MemorySessionStore):
    """The embedded store, with operations that fail on demand like an unreachable network store."""

    failing: set[str] = set()

    def __getattribute__(self, name):
        if name in FlakyStore.failing:
            def unreachable(*args):
                raise ConnectionError(f"injected store fault in {name}")
            return unreachable
        return super().__getattribute__(name)


@pytest.fixture
def flaky():
    FlakyStore.failing = set()
    yield FlakyStore
    FlakyStore.failing = set()


def test_a_store_that_raises_ends_the_call_and_leaves_the_session_usable(tiny_model, flaky):
    with InProcessServer(tiny_model, session_store_factory=flaky) as srv:
        sid = httpx.post(srv.url + "/sessions", json={"prompt": "KING:", "seed": 3}, timeout=60).json()["session_id"]
        before = httpx.get(f"{srv.url}/sessions/{sid}").json()
        flaky.failing = {"commit"}
        r = httpx.post(f"{srv.url}/sessions/{sid}/generate", json={"max_new_tokens": 20}, timeout=60)
        assert_engine_error(r, "session_store_unavailable")
        events = sse_events(f"{srv.url}/sessions/{sid}/generate", {"max_new_tokens": 20})
        assert [e for e, _ in events][-2:] == ["error", "done"] and events[-2][1]["error"]["type"] == "session_store_unavailable"
        flaky.failing = {"lease", "get"}
        assert_engine_error(httpx.post(f"{srv.url}/sessions/{sid}/generate", json={"max_new_tokens": 5}, timeout=60),
                            "session_store_unavailable")
        assert_engine_error(httpx.get(f"{srv.url}/sessions/{sid}"), "session_store_unavailable")
        assert httpx.get(srv.url + "/ready").status_code == 200  # plain generation does not need the store
        assert_served(srv)
        flaky.failing = set()
        assert_idle(srv)
        after = httpx.get(f"{srv.url}/sessions/{sid}").json()  # nothing was committed, and the lease went back
        assert after["position"] == before["position"] and not after["busy"]
        assert httpx.post(f"{srv.url}/sessions/{sid}/generate", json={"max_new_tokens": 5}, timeout=60).status_code == 200


def test_when_the_engine_thread_dies_everything_answers_503_at_once(tiny_model):
    switch = Switch()

    def hook(engine, loaded, store):
        real = engine._publish_counts

        def publish():
            switch.trip("the loop itself")
            real()

        engine._publish_counts = publish

    with InProcessServer(tiny_model, hooks=[hook]) as srv:
        assert_served(srv)
        switch.n = 1
        r = httpx.post(srv.url + "/generate", json={"max_new_tokens": 1000}, timeout=60)  # in flight when it dies
        assert_engine_error(r)
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "engine_error"
        for _ in range(3):
            assert_engine_error(httpx.post(srv.url + "/generate", json={"max_new_tokens": 5}, timeout=10))
        assert srv.engine.wait_idle(5)
