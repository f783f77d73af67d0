"""Several replicas on one real Redis: any replica continues any session exactly, a session is busy
on every replica at once, a replica that dies frees its session when its lease expires, and Redis
going away and coming back costs only the session calls made meanwhile."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from httpx_sse import connect_sse

from ..redis_server import RedisServer
from ..server import Server, wait_until

KEY = "replicas-share-this-session-key-0123456789"


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer(appendonly=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def replicas(trained_store, redis_server):
    a = Server(trained_store, session_store=redis_server.url, session_key=KEY)
    try:
        b = Server(trained_store, session_store=redis_server.url, session_key=KEY)
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def create(url: str, **body) -> str:
    r = httpx.post(f"{url}/sessions", json=body, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def call(url: str, sid: str, **body) -> str:
    r = httpx.post(f"{url}/sessions/{sid}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def assert_error(r: httpx.Response, status: int, type_: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == type_, r.text


CALLS = [dict(prompt=" thou", max_new_tokens=40), dict(max_new_tokens=60, temperature=0.7),
         dict(prompt="\nKING:", max_new_tokens=30, top_k=5)]


def test_replicas_continue_each_others_sessions_exactly(replicas):
    a, b = replicas
    shared = create(a.url, prompt="ROMEO:", seed=31)
    across = [call(srv.url, shared, **c) for srv, c in zip((b, a, b), CALLS)]
    alone = create(a.url, prompt="ROMEO:", seed=31)
    assert across == [call(a.url, alone, **c) for c in CALLS]
    meta = httpx.get(f"{b.url}/sessions/{shared}").json()
    assert meta["position"] == 6 + 5 + 40 + 60 + 6 + 30 and not meta["busy"]
    assert a.metric("charlstm_session_store_seconds_count", 'operation="commit"') >= 1


def test_one_session_called_through_two_replicas_at_once_one_200_one_409(replicas):
    a, b = replicas
    sid = create(a.url, prompt="KING:", seed=8)
    with httpx.Client(timeout=60) as client:
        with connect_sse(client, "POST", f"{a.url}/sessions/{sid}/generate",
                         json={"max_new_tokens": 2000, "stream": True}) as source:
            assert source.response.status_code == 200
            events = source.iter_sse()
            assert next(events).event == "token"  # A's call holds the lease now
            assert_error(httpx.post(f"{b.url}/sessions/{sid}/generate", json={"max_new_tokens": 5}), 409, "session_busy")
            assert_error(httpx.delete(f"{b.url}/sessions/{sid}"), 409, "session_busy")
            last = [e for e in events][-1]
            assert last.event == "done" and last.json()["finish_reason"] == "length"
    assert httpx.get(f"{b.url}/sessions/{sid}").json()["position"] == 5 + 2000


def test_a_replica_killed_mid_call_frees_the_session_with_its_state_before_the_call(trained_store, redis_server, replicas):
    a, _ = replicas
    doomed = Server(trained_store, session_store=redis_server.url, session_key=KEY, session_lease_s=1.5,
                    max_new_tokens=1_000_000)
    sid = create(a.url, prompt="FOOL:", seed=5)
    twin = create(a.url, prompt="FOOL:", seed=5)
    try:
        with httpx.Client(timeout=60) as client:
            with connect_sse(client, "POST", f"{doomed.url}/sessions/{sid}/generate",
                             json={"max_new_tokens": 1_000_000, "stream": True}) as source:
                assert source.response.status_code == 200
                events = source.iter_sse()
                assert next(events).event == "token"  # the call runs, under its lease
                doomed.stop(signal.SIGKILL)
                with pytest.raises(httpx.RemoteProtocolError):  # the stream ends with its server, it does not hang
                    for _ in events:
                        pass
    finally:
        doomed.stop(signal.SIGKILL)
    assert_error(httpx.post(f"{a.url}/sessions/{sid}/generate", json={"max_new_tokens": 5}), 409, "session_busy")
    wait_until(lambda: not httpx.get(f"{a.url}/sessions/{sid}").json()["busy"], timeout=20, what="the dead replica's lease to expire")
    assert httpx.get(f"{a.url}/sessions/{sid}").json()["position"] == 5
    assert call(a.url, sid, max_new_tokens=50) == call(a.url, twin, max_new_tokens=50)


def test_sessions_survive_a_redis_restart(replicas, redis_server):
    a, b = replicas
    sid = create(a.url, prompt="QUEEN:", seed=77)
    before = call(a.url, sid, max_new_tokens=40)
    redis_server.restart()  # SIGTERM: the append-only file is kept and read back
    after = wait_until(lambda: _call_or_none(b.url, sid, max_new_tokens=40), timeout=20, what="a session call after the restart")
    twin = create(a.url, prompt="QUEEN:", seed=77)
    assert before + after == call(a.url, twin, max_new_tokens=80)


def test_redis_away_session_routes_503_generate_200_and_back_by_itself(replicas, redis_server):
    a, b = replicas
    sid = create(a.url, prompt="GHOST:", seed=3)
    failures = a.metric("charlstm_session_store_failures_total", 'operation="lease"')
    redis_server.stop()
    try:
        for r in (httpx.post(f"{a.url}/sessions/{sid}/generate", json={"max_new_tokens": 5}, timeout=30),
                  httpx.get(f"{b.url}/sessions/{sid}", timeout=30),
                  httpx.delete(f"{b.url}/sessions/{sid}", timeout=30),
                  httpx.post(f"{a.url}/sessions", json={"prompt": "KING:"}, timeout=30)):
            assert_error(r, 503, "session_store_unavailable")
            assert r.headers["retry-after"] == "1"
        r = httpx.post(f"{a.url}/generate", json={"prompt": "KING:", "max_new_tokens": 20}, timeout=30)
        assert r.status_code == 200 and len(r.json()["text"]) == 20
        # /ready never asks the store: the background sweep's last look says it is away, and the replica stays in
        wait_until(lambda: httpx.get(f"{b.url}/ready", timeout=5).json()["session_store"]["available"] is False,
                   what="the sweep to see the store away")
        assert httpx.get(f"{b.url}/ready", timeout=5).status_code == 200
        assert a.metric("charlstm_session_store_failures_total", 'operation="lease"') == failures + 1
    finally:
        redis_server.start()
    for srv in (a, b):  # neither replica restarted
        wait_until(lambda: httpx.get(f"{srv.url}/ready").json()["session_store"]["available"], what="the store to be back")
    assert call(b.url, sid, max_new_tokens=10) and call(a.url, sid, max_new_tokens=10)
    assert httpx.get(f"{a.url}/sessions/{sid}").json()["position"] == 6 + 20


def test_a_replica_started_while_redis_is_away_serves_and_takes_sessions_once_it_is_back(trained_store):
    away = RedisServer()
    away.stop()
    srv = Server(trained_store, session_store=away.url, session_key=KEY)
    try:
        wait_until(lambda: httpx.get(f"{srv.url}/ready").json()["session_store"]["available"] is False, what="the store seen away")
        assert httpx.post(f"{srv.url}/generate", json={"max_new_tokens": 5}).status_code == 200
        assert_error(httpx.post(f"{srv.url}/sessions", json={}, timeout=30), 503, "session_store_unavailable")
        away.start()
        wait_until(lambda: httpx.post(f"{srv.url}/sessions", json={}, timeout=30).status_code == 201, what="sessions once Redis is up")
        tiny_sha = json.loads((trained_store / "tiny" / "v1" / "card.json").read_text())["weights_sha256"].encode()
        assert away.client().hget("charlstm:marker", "model:tiny@v1") == tiny_sha  # the deferred check claimed the store
    finally:
        srv.stop()
        away.close()


def test_a_replica_with_another_session_key_refuses_to_start(trained_store, redis_server, replicas):
    with pytest.raises(RuntimeError, match="same CHARLSTM_SESSION_KEY"):
        Server(trained_store, session_store=redis_server.url, session_key="not-the-key-the-others-use-0123456789")


def _call_or_none(url: str, sid: str, **body) -> str | None:
    r = httpx.post(f"{url}/sessions/{sid}/generate", json=body, timeout=30)
    return r.json()["text"] if r.status_code == 200 else None
