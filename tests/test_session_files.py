"""What the session layer leaves on disk and in logs: private modes whatever the umask, no session id in
the access log, and snapshots that degrade instead of discarding (a full disk, a read-only or failing
file, real corruption)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import httpx
import pytest

from .server import Server, wait_until


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ready(srv) -> dict:
    return httpx.get(srv.url + "/ready", timeout=5).json()


def snapshots(srv) -> int:
    return ready(srv)["session_store"]["snapshots"]


def new_session(srv, prompt: str = "KING:\n") -> str:
    r = httpx.post(srv.url + "/sessions", json={"prompt": prompt, "seed": 3}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def test_the_session_files_are_private_whatever_the_umask(trained_store, tmp_path):
    folder = tmp_path / "state" / "sessions"
    db = folder / "s.sqlite3"
    old = os.umask(0o022)  # the usual umask, inherited by the server
    try:
        srv = Server(trained_store, session_db=db, snapshot_interval_s=0.2)
    finally:
        os.umask(old)
    try:
        new_session(srv)
        wait_until(lambda: snapshots(srv) >= 1 and db.exists(), what="a snapshot")
        reader = sqlite3.connect(db)  # a reader keeps the WAL and SHM files in place while the next snapshot writes
        reader.execute("SELECT count(*) FROM sessions").fetchone()
        done = snapshots(srv)
        new_session(srv, "QUEEN:\n")
        wait_until(lambda: snapshots(srv) > done, what="a second snapshot")
        assert mode(folder) == 0o700
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.key"), Path(f"{db}.lock")):
            assert path.exists() and mode(path) == 0o600, (path, oct(mode(path)))
        reader.close()
    finally:
        srv.stop()


def test_the_access_log_never_holds_a_session_id(trained_store, tmp_path):
    srv = Server(trained_store, session_db=tmp_path / "s.sqlite3", log_level="info")
    try:
        sid = new_session(srv)
        for method, path in (("GET", f"/sessions/{sid}"), ("GET", f"/sessions/{sid}/export"),
                             ("POST", f"/sessions/{sid}/generate"), ("POST", f"/sessions/{sid}/fork")):
            r = httpx.request(method, srv.url + path, json={} if method == "POST" else None, timeout=30)
            assert r.status_code in (200, 201), r.text
        assert httpx.get(srv.url + "/sessions/not-a-real-session-id-at-all", timeout=5).status_code == 404
        whole_log = lambda: Path(srv.log.name).read_text()  # noqa: E731
        wait_until(lambda: f"/sessions/{sid[:4]}…/fork" in whole_log(), what="the access log line of the fork")
        log = whole_log()
        assert sid not in log and sid[4:12] not in log
        assert "not-a-real-session-id-at-all" not in log and "/sessions/not-…" in log
    finally:
        srv.stop()
