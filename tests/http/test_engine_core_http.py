"""Over HTTP: clients that leave free their places at once, settings that contradict each other stop
the start, plain errors are never 200, and the input rules of the native API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx

from ..server import ROOT, Server, wait_until


def leave_before_reading(url: str, body: dict) -> None:
    """Send a streaming request on a raw socket and hang up without reading a byte."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)


def test_120_streams_that_leave_while_waiting_or_ingesting_free_their_places(trained_store):
    srv = Server(trained_store, max_new_tokens=1_000_000)
    try:
        prompt = ("KING:\nthou art my lord, and the night is sweet.\n" * 100)[:3900]
        for _ in range(120):
            leave_before_reading(srv.url, {"prompt": prompt, "max_new_tokens": 1_000_000, "stream": True})
        seen = []

        def drained():
            running, waiting = srv.metric("charlstm_running_streams"), srv.metric("charlstm_waiting_streams")
            seen.append((running, waiting))
            return running == 0 and waiting == 0

        wait_until(drained, timeout=10, what="running and waiting streams to return to 0")
        assert all(r >= 0 and w >= 0 for r, w in seen), "a gauge went negative"
        assert srv.metric("charlstm_client_disconnects_total") >= 1
        r = httpx.post(srv.url + "/generate", json={"max_new_tokens": 5}, timeout=30)
        assert r.status_code == 200
    finally:
        srv.stop()


def test_contradicting_settings_stop_the_start_with_one_message_naming_both(trained_store):
    env = {"CHARLSTM_MODEL_STORE": str(trained_store), "CHARLSTM_MODEL": "tiny", "CHARLSTM_DEFAULT_MAX_NEW_TOKENS": "500",
           "CHARLSTM_MAX_NEW_TOKENS": "100", "CHARLSTM_SESSION_DB": ""}
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "default_max_new_tokens=500" in out.stderr and "max_new_tokens=100" in out.stderr


def test_unknown_characters_follow_the_requested_policy(server, tiny_model):
    assert "9" not in tiny_model.vocab and "Z" not in tiny_model.vocab
    r = httpx.post(server.url + "/generate", json={"prompt": "In 1597", "max_new_tokens": 3})
    assert r.status_code == 422 and "'1'" in r.json()["error"]["message"] and "unknown_chars" in r.json()["error"]["message"]
    skip = httpx.post(server.url + "/generate", json={"prompt": "KING 9Z:", "unknown_chars": "skip", "max_new_tokens": 20, "seed": 2}).json()
    plain = httpx.post(server.url + "/generate", json={"prompt": "KING :", "max_new_tokens": 20, "seed": 2}).json()
    assert skip["text"] == plain["text"] and skip["unknown_chars"] == {"policy": "skip", "count": 2}
    assert skip["usage"]["prompt_tokens"] == 6
    rep = httpx.post(server.url + "/generate", json={"prompt": "KING9:", "unknown_chars": "replace", "replacement": " ",
                                                     "max_new_tokens": 20, "seed": 2}).json()
    assert rep["text"] == plain["text"] and rep["unknown_chars"] == {"policy": "replace", "count": 1}
    bad = httpx.post(server.url + "/generate", json={"prompt": "KING9", "unknown_chars": "replace", "replacement": "9"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "replacement"


def test_stop_takes_a_string_and_refuses_one_that_can_never_match(server):
    full = httpx.post(server.url + "/generate", json={"prompt": "FOOL:\n", "max_new_tokens": 120, "seed": 9}).json()["text"]
    stop = full[40:43]
    one = httpx.post(server.url + "/generate", json={"prompt": "FOOL:\n", "max_new_tokens": 120, "seed": 9, "stop": stop}).json()
    assert one["finish_reason"] == "stop" and one["text"] == full[: full.find(stop)]
    r = httpx.post(server.url + "/generate", json={"prompt": "FOOL:\n", "stop": ["the", "a9"]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stop.1" and "never match" in r.json()["error"]["message"]


def test_a_session_seed_reseeds_it_and_the_start_character_counts(server):
    created = httpx.post(server.url + "/sessions", json={"seed": 5}).json()
    assert created["position"] == 1  # the start character
    fresh = httpx.post(server.url + "/generate", json={"max_new_tokens": 30, "seed": 5}).json()
    assert fresh["usage"]["prompt_tokens"] == 1
    sid = created["session_id"]
    first = httpx.post(f"{server.url}/sessions/{sid}/generate", json={"max_new_tokens": 30}).json()
    assert first["text"] == fresh["text"] and first["seed"] == 5 and first["session"]["position"] == 31
    reseeded = httpx.post(f"{server.url}/sessions/{sid}/generate", json={"max_new_tokens": 10, "seed": 77}).json()
    assert reseeded["seed"] == 77 and reseeded["session"]["seed"] == 77
    after = httpx.post(f"{server.url}/sessions/{sid}/generate", json={"max_new_tokens": 10}).json()
    assert after["seed"] == 77  # the new seed stays in force


def test_ttl_has_one_upper_bound_the_one_in_force(server):
    bound = httpx.get(server.url + "/info").json()["limits"]["max_session_ttl_s"]
    doc = httpx.get(server.url + "/openapi.json").json()
    ttl = doc["components"]["schemas"]["SessionCreate"]["properties"]["ttl_seconds"]
    maxima = [b["maximum"] for b in ttl.get("anyOf", [ttl]) if "maximum" in b]
    assert maxima == [bound]
    r = httpx.post(server.url + "/sessions", json={"ttl_seconds": bound + 1})
    assert r.status_code == 422 and f"{bound:g}" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/sessions", json={"ttl_seconds": 10**9})
    assert r.status_code == 422 and f"{bound:g}" in r.json()["error"]["message"]


def test_start_up_log_names_the_model_and_the_sessions_restored(trained_store, tiny_model, tmp_path):
    srv = Server(trained_store, log_level="info", session_db=tmp_path / "s.sqlite3")
    try:
        log = srv.output()
    finally:
        srv.stop()
    line = next(x for x in log.splitlines() if "serving tiny@v1" in x)
    assert tiny_model.card["weights_sha256"][:12] in line and "0 restored" in line and "memory store" in line
    assert f"127.0.0.1:{srv.port}" in line and "max batch 64" in line


def test_the_service_serves_the_store_default_when_no_model_is_named(trained_store):
    from service.model import store

    store.set_default("tiny@v1", trained_store)
    try:
        srv = Server(trained_store, model="")
        try:
            assert httpx.get(srv.url + "/info").json()["model"]["name"] == "tiny"
        finally:
            srv.stop()
    finally:
        (trained_store / store.DEFAULT_FILE).unlink()


def test_score_takes_the_unknown_character_policy(server, tiny_model):
    clean = httpx.post(server.url + "/score", json={"text": "KING :\nthe night"}).json()
    r = httpx.post(server.url + "/score", json={"text": "KING 9:\nthe night"})
    assert r.status_code == 422 and "'9'" in r.json()["error"]["message"]
    skipped = httpx.post(server.url + "/score", json={"text": "KING 9:\nthe night", "unknown_chars": "skip"}).json()
    assert skipped["logprobs"] == clean["logprobs"] and skipped["unknown_chars"] == {"policy": "skip", "count": 1}
    replaced = httpx.post(server.url + "/score", json={"text": "KING9:\nthe night", "unknown_chars": "replace"}).json()
    assert replaced["logprobs"] == clean["logprobs"] and replaced["unknown_chars"] == {"policy": "replace", "count": 1}
