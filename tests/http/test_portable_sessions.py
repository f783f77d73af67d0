"""Portable sessions (issue 13): export, import and fork over HTTP, the blob's integrity and bounds, the
key across a restart, and the command line's --session-in/--session-out, all against a real server.

Every equality here is character for character on seeded sampling at temperature 1, where a state
that differed in any float would soon pick another character."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from httpx_sse import connect_sse

from service.cli import session_file
from service.sessions import blob as session_blob
from service.sessions.blob import SessionValue
from service.settings import Settings

from ..server import ROOT, Server, wait_until
from ..session_store_contract import same_state
from .test_api import assert_error
from .test_fuzz import server_errors

KEY = "portable-test-key-" + "k" * 32


@pytest.fixture(scope="module")
def keyed(trained_store):
    """A server whose key the tests know, so they can sign blobs of their own."""
    srv = Server(trained_store, session_key=KEY, max_new_tokens=1_000_000)
    yield srv
    srv.stop()


def new_session(srv, prompt="KING:\n", seed=11, **extra) -> dict:
    r = httpx.post(srv.url + "/sessions", json={"prompt": prompt, "seed": seed, **extra}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def say(srv, sid: str, prompt: str = "", n: int = 40) -> str:
    """One session call at temperature 1 (the session's own seed and counter)."""
    r = httpx.post(f"{srv.url}/sessions/{sid}/generate", json={"prompt": prompt, "max_new_tokens": n, "temperature": 1.0},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def export(srv, sid: str) -> dict:
    r = httpx.get(f"{srv.url}/sessions/{sid}/export", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def import_(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/sessions/import", json=body, timeout=30)


def read(blob_text: str, key: str = KEY) -> SessionValue:
    return session_blob.decode(session_blob.from_text(blob_text), key.encode())


def signed(value: SessionValue, key: str = KEY) -> str:
    return session_blob.to_text(session_blob.encode(value, key.encode()))


# ---------------------------------------------------------------------------- export and import
def test_export_is_the_issue_shape_and_carries_the_session(keyed, tiny_model):
    s = new_session(keyed, seed=5)
    say(keyed, s["session_id"], "QUEEN", 25)
    out = export(keyed, s["session_id"])
    assert set(out) == {"format", "model", "position", "backend", "data"} and out["backend"] == "torch"
    assert out["format"] == "charlstm-session/1" and out["model"] == "tiny@v1"
    cfg = tiny_model.config
    assert out["position"] == s["position"] + 5 + 25
    assert len(out["data"]) == session_blob.text_chars(cfg.num_layers, cfg.hidden_size)
    value = read(out["data"])
    assert value.state.shape == (2, cfg.num_layers, cfg.hidden_size)
    assert (value.seed, value.counter, value.position) == (5, 25, out["position"])
    assert value.fingerprint == tiny_model.card["weights_sha256"]
    assert_error(httpx.get(keyed.url + "/sessions/nope/export"), 404, "session_not_found")


def test_export_delete_import_continues_like_the_uninterrupted_session(keyed):
    moved, stayed = new_session(keyed, seed=21), new_session(keyed, seed=21)
    assert say(keyed, moved["session_id"], "ROMEO", 30) == say(keyed, stayed["session_id"], "ROMEO", 30)
    blob = export(keyed, moved["session_id"])
    assert httpx.delete(f"{keyed.url}/sessions/{moved['session_id']}").status_code == 204
    r = import_(keyed, blob)
    assert r.status_code == 201, r.text
    back = r.json()
    assert back["session_id"] != moved["session_id"]  # ids never come from a blob
    assert back["position"] == blob["position"] and back["seed"] == 21 and not back["busy"]
    assert httpx.get(f"{keyed.url}/sessions/{back['session_id']}").json()["position"] == blob["position"]
    for prompt, n in (("", 60), ("JULIET:\n", 80), ("O", 1)):
        assert say(keyed, back["session_id"], prompt, n) == say(keyed, stayed["session_id"], prompt, n)
    # The same blob imports again as yet another session, and only `data` is needed.
    again = import_(keyed, {"data": blob["data"], "ttl_seconds": 30})
    assert again.status_code == 201 and again.json()["ttl_seconds"] == 30
    assert again.json()["session_id"] not in (back["session_id"], moved["session_id"])


def test_exporting_a_busy_session_gives_the_state_before_the_running_call(keyed):
    s = new_session(keyed, seed=8)
    sid = s["session_id"]
    before = read(export(keyed, sid)["data"])
    with httpx.Client(timeout=60) as client:
        body = {"prompt": "FOOL", "max_new_tokens": 1_000_000, "stream": True}
        with connect_sse(client, "POST", f"{keyed.url}/sessions/{sid}/generate", json=body) as source:
            events = source.iter_sse()
            assert next(events).event == "token"  # the call is running
            assert httpx.get(f"{keyed.url}/sessions/{sid}").json()["busy"]
            during = export(keyed, sid)
            assert_error(httpx.post(f"{keyed.url}/sessions/{sid}/fork"), 409, "session_busy")
    assert during["position"] == s["position"]
    value = read(during["data"])
    assert same_state(value.state, before.state) and (value.seed, value.counter) == (before.seed, before.counter)
    wait_until(lambda: not httpx.get(f"{keyed.url}/sessions/{sid}").json()["busy"], what="the cancelled call's lease")
    assert httpx.post(f"{keyed.url}/sessions/{sid}/fork").status_code == 201  # free again: it forks


# ---------------------------------------------------------------------------- fork
def test_forks_continue_identically_then_independently(keyed):
    parent, reference = new_session(keyed, seed=31), new_session(keyed, seed=31)
    r = httpx.post(f"{keyed.url}/sessions/{parent['session_id']}/fork", json={})
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["session_id"] != parent["session_id"]
    assert (child["position"], child["seed"], child["ttl_seconds"]) == (parent["position"], 31, parent["ttl_seconds"])
    p, c, ref = parent["session_id"], child["session_id"], reference["session_id"]
    first = say(keyed, p, "KING", 50)
    assert say(keyed, c, "KING", 50) == first == say(keyed, ref, "KING", 50)
    # Then apart: the child's calls change nothing of the parent's, which goes on like the reference.
    child_text = say(keyed, c, "GHOST:\n", 80)
    parent_text = say(keyed, p, "QUEEN:\n", 80)
    assert parent_text == say(keyed, ref, "QUEEN:\n", 80)
    assert child_text != parent_text
    # Rewind: fork before a call, and the fork replays that call exactly.
    saved = httpx.post(f"{keyed.url}/sessions/{p}/fork", json={"ttl_seconds": 120}).json()
    assert saved["ttl_seconds"] == 120
    tried = say(keyed, p, "", 40)
    assert say(keyed, saved["session_id"], "", 40) == tried


def test_fork_refusals_keep_the_error_shape(keyed):
    assert_error(httpx.post(keyed.url + "/sessions/nope/fork"), 404, "session_not_found")
    sid = new_session(keyed)["session_id"]
    assert_error(httpx.post(f"{keyed.url}/sessions/{sid}/fork", json={"ttl_seconds": 10**9}), 422, "invalid_field", "ttl_seconds")
    assert_error(httpx.post(f"{keyed.url}/sessions/{sid}/fork", json={"seed": 1}), 422, "invalid_field")
    assert_error(httpx.post(f"{keyed.url}/sessions/{sid}/fork", content=b"{", headers={"content-type": "application/json"}),
                 400, "invalid_json")


# ---------------------------------------------------------------------------- hostile blobs
def _flip(text: str, at: int) -> str:
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]


def hostile_blobs(good: dict, value: SessionValue) -> list[tuple[str, dict, int, str, str]]:
    """(what, body, status, error type, param) for every way a blob can be wrong."""
    data = good["data"]
    nan_state = value.state.copy()
    nan_state[1, 0, 3] = float("nan")
    inf_state = value.state.copy()
    inf_state[0, -1, 0] = float("inf")
    layers, hidden = value.state.shape[1], value.state.shape[2]

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    return [
        ("a changed byte in the state", {"data": _flip(data, len(data) // 2)}, 422, "invalid_session_blob", "data"),
        ("a changed byte in the header", {"data": _flip(data, 30)}, 422, "invalid_session_blob", "data"),
        ("a changed tag", {"data": _flip(data, len(data) - 3)}, 422, "invalid_session_blob", "data"),
        ("truncated", {"data": data[:-8]}, 422, "invalid_session_blob", "data"),
        ("truncated to nothing much", {"data": data[:40]}, 422, "invalid_session_blob", "data"),
        ("oversized", {"data": data + data}, 422, "invalid_session_blob", "data"),
        ("not base64url", {"data": "!" * len(data)}, 422, "invalid_session_blob", "data"),
        ("standard base64 characters", {"data": "+/" + data[2:]}, 422, "invalid_session_blob", "data"),
        ("signed with another key", {"data": signed(value, "another-key-" + "x" * 32)}, 422, "invalid_session_blob", "data"),
        ("a NaN, signed with the key", {"data": signed(_with(value, state=nan_state))}, 422, "invalid_session_blob", "data"),
        ("an infinity, signed with the key", {"data": signed(_with(value, state=inf_state))}, 422, "invalid_session_blob", "data"),
        ("another shape, signed with the key", {"data": signed(_with(value, state=zeros(2, layers + 1, hidden)))},
         422, "invalid_session_blob", "data"),
        ("the same size in another shape, signed with the key",
         {"data": signed(_with(value, state=zeros(2, layers * 2, hidden // 2)))}, 422, "invalid_session_blob", "data"),
        ("a smaller shape, signed with the key", {"data": signed(_with(value, state=zeros(2, layers, hidden // 2)))},
         422, "invalid_session_blob", "data"),
        ("a position that contradicts the blob", {**good, "position": good["position"] + 1}, 422, "invalid_session_blob", "position"),
        ("another format", {**good, "format": "charlstm-session/2"}, 422, "invalid_field", "format"),
        ("no data", {"format": good["format"]}, 422, "invalid_field", "data"),
        ("data not a string", {"data": 12345}, 422, "invalid_field", "data"),
        ("an unknown field", {**good, "state": [0.0]}, 422, "invalid_field", "state"),
    ]


def _with(value: SessionValue, **changes) -> SessionValue:
    return SessionValue(**{**value.__dict__, **changes})


def test_tampered_truncated_foreign_and_non_finite_blobs_get_the_right_4xx(keyed, tiny_model):
    good = export(keyed, new_session(keyed, seed=3)["session_id"])
    value = read(good["data"])
    for what, body, status, type_, param in hostile_blobs(good, value):
        err = assert_error(import_(keyed, body), status, type_, param)
        assert err["message"], what
    # Intact but of other weights: 409, naming both models.
    foreign = signed(_with(value, fingerprint="ab" * 32))
    err = assert_error(import_(keyed, {"data": foreign}), 409, "model_mismatch", "data")
    assert "tiny@v1" in err["message"] and "abababababab" in err["message"]
    assert tiny_model.card["weights_sha256"][:12] in err["message"]
    # Bigger than any body the server reads: 413 before anything is parsed.
    big = json.dumps({"data": "A" * (2 << 20)}).encode()
    assert_error(httpx.post(keyed.url + "/sessions/import", content=big, headers={"content-type": "application/json"}), 413)
    assert import_(keyed, good).status_code == 201  # and the good one still imports
    assert server_errors(keyed) == 0


def test_the_openapi_document_bounds_data_to_this_models_blob(keyed, tiny_model):
    doc = httpx.get(keyed.url + "/openapi.json").json()
    data = doc["components"]["schemas"]["SessionImport"]["properties"]["data"]
    cfg = tiny_model.config
    n = session_blob.text_chars(cfg.num_layers, cfg.hidden_size)
    assert data["minLength"] == data["maxLength"] == n
    assert {"/sessions/import", "/sessions/{session_id}/export", "/sessions/{session_id}/fork"} <= set(doc["paths"])
    assert set(doc["paths"]["/sessions/import"]) == {"post"}
    # and a method it lacks names only what that path serves, though /sessions/{session_id} matches it too
    r = httpx.put(keyed.url + "/sessions/import")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_blob_sizes_follow_the_state_shape():
    rng = np.random.default_rng(0)
    for layers, hidden in ((1, 4), (2, 32), (2, 512), (3, 100)):
        value = SessionValue(state=rng.standard_normal((2, layers, hidden), dtype=np.float32), seed=2**53 - 1, counter=7,
                             position=9, created_at=1.5, fingerprint="cd" * 32)
        blob = session_blob.encode(value, b"k")
        assert len(blob) == session_blob.blob_bytes(layers, hidden)
        assert len(session_blob.to_text(blob)) == session_blob.text_chars(layers, hidden)
        back = session_blob.decode(session_blob.from_text(session_blob.to_text(blob)), b"k", layers=layers, hidden=hidden)
        assert same_state(back.state, value.state) and (back.seed, back.counter, back.position) == (2**53 - 1, 7, 9)


# ---------------------------------------------------------------------------- the key
def test_a_restarted_server_accepts_its_own_blobs_and_another_key_is_refused(trained_store, tmp_path):
    db = tmp_path / "sessions.sqlite3"
    first = Server(trained_store, session_db=db)  # no CHARLSTM_SESSION_KEY: a key file beside the database
    try:
        sid = new_session(first, seed=13)["session_id"]
        say(first, sid, "KING", 20)
        blob = export(first, sid)
        expected = say(first, sid, "", 60)
    finally:
        first.stop()
    key_file = Path(f"{db}.key")
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    second = Server(trained_store, session_db=db)
    try:
        r = import_(second, blob)
        assert r.status_code == 201, r.text
        assert say(second, r.json()["session_id"], "", 60) == expected
    finally:
        second.stop()
    other = Server(trained_store, session_db=tmp_path / "other.sqlite3")  # another key file, another key
    try:
        assert_error(import_(other, blob), 422, "invalid_session_blob", "data")
    finally:
        other.stop()


# ---------------------------------------------------------------------------- the command line
def charlstm(store_root, *args, env=None):
    """`charlstm sample` on the tiny model; no key but what the test gives (no key file where it looks)."""
    full_env = {k: v for k, v in os.environ.items() if k != "CHARLSTM_SESSION_KEY"}
    full_env.update(OMP_NUM_THREADS="1", CHARLSTM_SESSION_DB=str(ROOT / "tests" / "no-such-db.sqlite3"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "service.cli", "--store", str(store_root), "sample", "--model", "tiny", *args],
                          capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=120)


def test_cli_continues_on_the_backend_the_export_names(trained_store, tmp_path):
    """An export says which backend its server draws with, and `charlstm sample --session-in` continues on it
    unless told otherwise: the text is the server's to the character without --backend."""
    srv = Server(trained_store, session_key=KEY, backend="onnx-int8")
    try:
        travelled, stayed = new_session(srv, seed=43), new_session(srv, seed=43)
        exported = export(srv, travelled["session_id"])
        assert exported["backend"] == "onnx-int8"
        path = tmp_path / "out.json"
        path.write_text(json.dumps(exported))
        out = charlstm(trained_store, "--session-in", str(path), "--prompt", "KING", "--length", "60", "--temperature", "1",
                       env={"CHARLSTM_SESSION_KEY": KEY})
        assert out.returncode == 0, out.stderr
        assert out.stdout == say(srv, stayed["session_id"], "KING", 60) + "\n"
        assert import_(srv, exported).status_code == 201  # an export with its backend imports as it is
    finally:
        srv.stop()


def test_cli_round_trip_equals_the_server_only_run(keyed, trained_store, tmp_path):
    travelled, stayed = new_session(keyed, seed=41), new_session(keyed, seed=41)
    assert say(keyed, travelled["session_id"], "ROMEO:\n", 30) == say(keyed, stayed["session_id"], "ROMEO:\n", 30)
    exported, back = tmp_path / "out.json", tmp_path / "back.json"
    exported.write_text(json.dumps(export(keyed, travelled["session_id"])))
    # Offline: the same call the server makes next, then the session goes home.
    out = charlstm(trained_store, "--session-in", str(exported), "--session-out", str(back), "--prompt", "KING",
                   "--length", "70", "--temperature", "1", env={"CHARLSTM_SESSION_KEY": KEY})
    assert out.returncode == 0, out.stderr
    assert out.stdout == say(keyed, stayed["session_id"], "KING", 70) + "\n"
    home = import_(keyed, json.loads(back.read_text()))
    assert home.status_code == 201, home.text
    assert home.json()["position"] == httpx.get(f"{keyed.url}/sessions/{stayed['session_id']}").json()["position"]
    for prompt, n in (("", 90), ("QUEEN:\n", 50)):
        assert say(keyed, home.json()["session_id"], prompt, n) == say(keyed, stayed["session_id"], prompt, n)


def test_cli_checks_the_key_unless_told_not_to(keyed, trained_store, tmp_path):
    sid = new_session(keyed, seed=43)["session_id"]
    exported = tmp_path / "s.json"
    exported.write_text(json.dumps(export(keyed, sid)))
    wrong = charlstm(trained_store, "--session-in", str(exported), "--length", "10", "--session-key", "w" * 40)
    assert wrong.returncode == 2 and "integrity tag" in wrong.stderr and "Traceback" not in wrong.stderr
    none = charlstm(trained_store, "--session-in", str(exported), "--length", "10", "--session-key-file", str(tmp_path / "no.key"))
    assert none.returncode == 2 and "does not exist" in none.stderr
    unchecked = charlstm(trained_store, "--session-in", str(exported), "--length", "40", "--temperature", "1",
                         "--session-key", "w" * 40, "--no-verify")
    assert unchecked.returncode == 0, unchecked.stderr
    assert unchecked.stdout == say(keyed, sid, "", 40) + "\n"
    key_file = tmp_path / "server.key"
    key_file.write_text(KEY + "\n")
    from_file = charlstm(trained_store, "--session-in", str(exported), "--length", "5", "--session-key-file", str(key_file))
    assert from_file.returncode == 0, from_file.stderr
    exported.write_text("{not json")
    broken = charlstm(trained_store, "--session-in", str(exported), "--length", "5", "--no-verify")
    assert broken.returncode == 2 and "not JSON" in broken.stderr


def test_cli_starts_a_session_the_server_continues(keyed, trained_store, tmp_path):
    """--session-out alone primes a new session from --prompt, as POST /sessions does."""
    made = tmp_path / "new.json"
    out = charlstm(trained_store, "--session-out", str(made), "--prompt", "GHOST:\n", "--seed", "17", "--length", "0",
                   env={"CHARLSTM_SESSION_KEY": KEY})
    assert out.returncode == 0 and out.stdout == "\n", out.stderr
    on_server = new_session(keyed, prompt="GHOST:\n", seed=17)
    imported = import_(keyed, json.loads(made.read_text())).json()
    assert imported["position"] == on_server["position"]
    assert say(keyed, imported["session_id"], "", 60) == say(keyed, on_server["session_id"], "", 60)


def test_the_cli_reads_the_servers_key_where_the_server_keeps_it(tmp_path, monkeypatch):
    """The server's settings say where: CHARLSTM_SESSION_KEY, else the key file beside CHARLSTM_SESSION_DB,
    else beside the default database."""
    from argparse import Namespace

    from service.sessions.blob import load_or_create_key

    given = Namespace(session_key=None, session_key_file=None)
    db = tmp_path / "elsewhere.sqlite3"
    made, _ = load_or_create_key(None, str(db))  # as the server makes it
    monkeypatch.delenv("CHARLSTM_SESSION_KEY", raising=False)
    monkeypatch.setenv("CHARLSTM_SESSION_DB", str(db))
    assert session_file.read_key(given) == made
    monkeypatch.setenv("CHARLSTM_SESSION_KEY", KEY)
    assert session_file.read_key(given) == KEY.encode()
    monkeypatch.delenv("CHARLSTM_SESSION_KEY")
    monkeypatch.delenv("CHARLSTM_SESSION_DB")
    monkeypatch.chdir(tmp_path)  # the default database's folder, relative to where the command runs
    assert session_file.read_key(given) is None
    default = tmp_path / Settings.model_fields["session_db"].default
    made, _ = load_or_create_key(None, str(default))
    assert session_file.read_key(given) == made
    Path(f"{default}.key").write_text("short\n")
    with pytest.raises(ValueError, match="damaged"):
        session_file.read_key(given)


# ---------------------------------------------------------------------------- blob lifetime and keys
def test_an_export_older_than_the_max_age_is_refused_after_its_tag(keyed):
    """A leaked export stops importing: the signed export time is checked once the tag holds."""
    value = read(export(keyed, new_session(keyed)["session_id"])["data"])
    week = Settings.model_fields["session_blob_max_age_s"].default
    assert import_(keyed, {"data": signed(dataclasses.replace(value, created_at=time.time() - week + 60))}).status_code == 201
    old = import_(keyed, {"data": signed(dataclasses.replace(value, created_at=time.time() - week - 60))})
    assert_error(old, 422, "session_blob_expired")
    assert old.json()["error"]["param"] == "data"
    future = import_(keyed, {"data": signed(dataclasses.replace(value, created_at=time.time() + 3600))})
    assert_error(future, 422, "invalid_session_blob")
    # the age is read only after the tag: an old blob signed with another key is refused for its tag
    forged = import_(keyed, {"data": signed(dataclasses.replace(value, created_at=0.0), key="x" * 40)})
    assert_error(forged, 422, "invalid_session_blob")


def test_a_short_or_placeholder_session_key_refuses_to_start(trained_store):
    placeholder = yaml.safe_load((ROOT / "deploy/kubernetes/secret.yaml").read_text())["stringData"]["session-key"]
    for key, says in (("k" * 31, "at least 32"), (placeholder, "placeholder")):
        with pytest.raises(RuntimeError) as e:
            Server(trained_store, session_key=key)
        assert says in str(e.value) and key not in str(e.value)  # the message never repeats the key


def test_the_manifests_placeholder_api_key_refuses_to_start(trained_store):
    placeholder = yaml.safe_load((ROOT / "deploy/kubernetes/secret.yaml").read_text())["stringData"]["api-key"]
    with pytest.raises(RuntimeError) as e:
        Server(trained_store, api_key=placeholder)
    assert "placeholder" in str(e.value) and placeholder not in str(e.value)
