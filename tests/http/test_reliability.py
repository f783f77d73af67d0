"""Isolation, sessions that outlive a restart or a crash, a corrupt session store, the API key."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3

import httpx
import pytest

from service.sessions.snapshots import SessionDB

from ..server import Server, wait_until
from ..session_store_contract import record
from .test_api import assert_error


def session_text(url: str, sid: str, **body) -> str:
    r = httpx.post(f"{url}/sessions/{sid}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def create(url: str, **body) -> str:
    r = httpx.post(f"{url}/sessions", json=body, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def test_interleaved_clients_get_the_text_they_would_get_alone(server):
    rng = random.Random(5)
    plans = {k: [dict(prompt=rng.choice(["", " thou", "\nKING:"]), max_new_tokens=rng.randint(5, 60),
                      temperature=rng.choice([0.5, 1.0]), top_k=rng.choice([0, 5])) for _ in range(4)]
             for k in range(12)}
    alone = {}
    for k, calls in plans.items():
        sid = create(server.url, prompt="QUEEN:", seed=1000 + k)
        alone[k] = [session_text(server.url, sid, **c) for c in calls]

    async def client(http, k):
        sid = (await http.post(f"{server.url}/sessions", json={"prompt": "QUEEN:", "seed": 1000 + k})).json()["session_id"]
        texts = []
        for c in plans[k]:
            texts.append((await http.post(f"{server.url}/sessions/{sid}/generate", json=c)).json()["text"])
        return k, texts

    async def crowd():
        async with httpx.AsyncClient(timeout=60) as http:
            order = list(plans)
            rng.shuffle(order)
            return dict(await asyncio.gather(*(client(http, k) for k in order)))

    together = asyncio.run(crowd())
    assert together == alone


def test_sessions_survive_a_graceful_restart(trained_store, tmp_path):
    db = tmp_path / "sessions.sqlite3"
    first = Server(trained_store, session_db=db)
    try:
        sid = create(first.url, prompt="ROMEO:", seed=17)
        before = session_text(first.url, sid, max_new_tokens=50)
        idle = create(first.url, prompt="KING:", seed=3)
    finally:
        assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    second = Server(trained_store, session_db=db)
    try:
        meta = httpx.get(f"{second.url}/sessions/{sid}").json()
        assert meta["position"] == 6 + 50 and meta["seed"] == 17
        assert httpx.get(f"{second.url}/sessions/{idle}").status_code == 200
        after = session_text(second.url, sid, max_new_tokens=50)
        twin = create(second.url, prompt="ROMEO:", seed=17)
        assert before + after == session_text(second.url, twin, max_new_tokens=100)
    finally:
        second.stop()


def test_a_crash_keeps_the_last_snapshot(trained_store, tmp_path):
    db = tmp_path / "sessions.sqlite3"
    first = Server(trained_store, session_db=db, snapshot_interval_s=0.2)
    try:
        sid = create(first.url, prompt="FOOL:", seed=2)
        session_text(first.url, sid, max_new_tokens=20)
        done = httpx.get(first.url + "/ready").json()["session_store"]["snapshots"]

        def snapshotted():  # the server reports a snapshot completed after the call, then the file holds it
            return httpx.get(first.url + "/ready").json()["session_store"]["snapshots"] > done

        wait_until(snapshotted, what="a snapshot completed after the session call")
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT position FROM sessions WHERE id = ?", (sid,)).fetchone() == (5 + 20,)
    finally:
        first.stop(signal.SIGKILL)
    second = Server(trained_store, session_db=db)
    try:
        assert httpx.get(f"{second.url}/sessions/{sid}").json()["position"] == 25
        assert session_text(second.url, sid, max_new_tokens=5)
    finally:
        second.stop()


def test_two_servers_never_share_a_session_database(trained_store, tmp_path):
    db = tmp_path / "sessions.sqlite3"
    first = Server(trained_store, session_db=db)
    try:
        with pytest.raises(RuntimeError, match="in use by another running server"):
            Server(trained_store, session_db=db)
        sid = create(first.url, prompt="KING:", seed=4)
    finally:
        first.stop()
    second = Server(trained_store, session_db=db)  # the first is gone: its file and its sessions are free
    try:
        assert httpx.get(f"{second.url}/sessions/{sid}").status_code == 200
    finally:
        second.stop()


def test_a_session_database_of_another_model_is_refused(trained_store, tmp_path):
    """A saved session of weights the server does not serve would not fit: the start is refused, naming both."""
    db = tmp_path / "sessions.sqlite3"
    SessionDB(db, {"other@v3": "ef" * 32}).write([record(model="ef" * 32)], [])
    with pytest.raises(RuntimeError, match="holds sessions of model other@v3.*tiny@v1"):
        Server(trained_store, session_db=db)


def test_a_corrupt_session_store_is_set_aside(trained_store, tmp_path):
    db = tmp_path / "sessions.sqlite3"
    db.write_bytes(b"this is not an SQLite database" * 100)
    srv = Server(trained_store, session_db=db, log_level="info")
    try:
        assert httpx.get(srv.url + "/ready").status_code == 200
        assert create(srv.url)
        aside = list(tmp_path.glob("sessions.sqlite3.corrupt-*"))
        assert aside and aside[0].read_bytes().startswith(b"this is not")
        assert "is corrupt" in srv.output() and "SQLITE_NOTADB" in srv.output()
    finally:
        srv.stop()


def test_api_key_guards_every_route_but_the_probes(trained_store):
    srv = Server(trained_store, api_key="s3cret-key")
    try:
        ok = {"Authorization": "Bearer s3cret-key"}
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/ready").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 401  # protected by default once a key is set
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        for method, path in (("POST", "/generate"), ("POST", "/sessions"), ("GET", "/info"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("GET", "/sessions/x"), ("DELETE", "/sessions/x")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
                r = httpx.request(method, srv.url + path, headers=headers, json={} if method == "POST" else None)
                assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", (path, headers)
                assert r.headers["www-authenticate"].startswith("Bearer")
        r = httpx.post(srv.url + "/generate", json={"max_new_tokens": 3}, headers=ok)
        assert r.status_code == 200 and len(r.json()["text"]) == 3
        assert httpx.get(srv.url + "/info", headers=ok).status_code == 200
    finally:
        srv.stop()


def test_trusted_hosts_answer_only_their_names_and_the_probes_any(trained_store):
    srv = Server(trained_store, trusted_hosts='["charlstm.test", "*.internal"]')
    try:
        for host, status in (("charlstm.test", 200), ("charlstm.test:8000", 200), ("api.internal", 200), ("evil.example", 400)):
            r = httpx.post(srv.url + "/generate", json={"max_new_tokens": 2}, headers={"Host": host}, timeout=30)
            assert r.status_code == status, (host, r.text)
        assert_error(httpx.post(srv.url + "/generate", json={}, headers={"Host": "evil.example"}), 400, "invalid_host")
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "K"}, headers={"Host": "evil.example"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"  # OpenAI's shape on /v1
        assert httpx.get(srv.url + "/ready", headers={"Host": "10.0.0.7:8000"}).status_code == 200
    finally:
        srv.stop()
