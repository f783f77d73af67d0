"""What the session layer leaves on disk and in logs: private modes whatever the umask, no session id in
the access log, and snapshots that degrade instead of discarding (a full disk, a read-only or failing
file, real corruption)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from service.engine.engine import EngineStats
from service.engine.observers import Fanout
from service.sessions.memory_store import MemorySessionStore
from service.sessions.snapshots import SessionDB, Snapshots

from ..server import Server, wait_until
from ..session_store_contract import FINGERPRINT, record


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


# ---------------------------------------------------------------------------- snapshots that degrade
class Faults:
    """What the injected connection does: None, or the SQLite error its next statements raise."""

    error: tuple[int, str, str] | None = None  # (code, name, message)
    on: tuple[str, ...] = ("INSERT", "DELETE", "COMMIT", "PRAGMA JOURNAL_MODE")
    auto_rollback = True  # as SQLite does on SQLITE_FULL: the transaction is gone when the error arrives


class FaultyConnection(sqlite3.Connection):
    """A real SQLite connection whose statements fail as a full or failing disk makes them fail."""

    def _fail(self, sql: str) -> None:
        if Faults.error is not None and sql.lstrip().upper().startswith(Faults.on):
            code, name, message = Faults.error
            if Faults.auto_rollback and self.in_transaction:
                super().execute("ROLLBACK")
            e = sqlite3.OperationalError(message)
            e.sqlite_errorcode, e.sqlite_errorname = code, name
            raise e

    def execute(self, sql, *args):
        self._fail(sql)
        return super().execute(sql, *args)

    def executemany(self, sql, *args):
        self._fail(sql)
        return super().executemany(sql, *args)


FULL = (13, "SQLITE_FULL", "database or disk is full")
IOERR = (10, "SQLITE_IOERR", "disk I/O error")


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setattr(SessionDB, "connection_class", FaultyConnection)
    monkeypatch.setattr(Faults, "error", None)
    return Faults


def saved_ids(path: Path) -> set[str]:
    """What the file holds, read by a connection of its own (no faults)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM sessions")}


def store_with(n: int) -> MemorySessionStore:
    store = MemorySessionStore(100)
    for _ in range(n):
        store.create(record())
    return store


def test_a_full_disk_keeps_the_last_good_file_and_every_session_in_memory(faulty, tmp_path):
    db = SessionDB(tmp_path / "s.sqlite3", {"tiny@v1": FINGERPRINT})
    store = store_with(20)
    failed = []
    class Failures:  # an observer of the events it cares about
        def on_session_snapshot_failed(self, operation):
            failed.append(("on_session_snapshot_failed", operation))

    snaps = Snapshots(db, store, interval_s=1.0, events=Fanout(EngineStats, [Failures()]))
    snaps.load()
    snaps.write()
    good = saved_ids(db.path)
    assert len(good) == 20 and snaps.status()["state"] == "ok"
    faulty.error = FULL
    new = [store.create(record()).id for _ in range(5)]
    store.delete(sorted(good)[0])
    snaps.write()
    status = snaps.status()
    assert saved_ids(db.path) == good and store.count() == 24  # the file as it was, the sessions in memory
    assert status["state"] == "degraded" and status["failures"] == 1 and failed == [("on_session_snapshot_failed", "write")]
    assert "SQLITE_FULL" in status["last_error"] and "rollback" not in status["last_error"]  # the real error, unmasked
    assert snaps.delay() == 2.0 and status["retry_in_s"] == 2.0
    snaps.write()
    assert snaps.delay() == 4.0 and snaps.status()["failures_in_a_row"] == 2  # the backoff doubles
    faulty.error = None
    snaps.write()
    assert saved_ids(db.path) == (good - {sorted(good)[0]}) | set(new)  # the retry writes everything
    assert snaps.status()["state"] == "ok" and snaps.delay() == 1.0


def test_persist_writes_what_each_caller_changed_before_it_answers_in_shared_transactions(faulty, tmp_path):
    """The group commit: 40 changes acknowledged at once share a few transactions, and every one is in the
    file when its persist returns; on a full disk persist says so instead of failing, and counts it."""
    db = SessionDB(tmp_path / "s.sqlite3", {"tiny@v1": FINGERPRINT})
    store = MemorySessionStore(100)
    snaps = Snapshots(db, store, interval_s=3600.0)
    snaps.load()

    async def change_and_persist():
        sid = (await asyncio.to_thread(store.create, record())).id
        durable = await snaps.persist()
        return sid, durable, sid in saved_ids(db.path)  # read from the file itself, before anything else runs

    async def crowd(n):
        return await asyncio.gather(*(change_and_persist() for _ in range(n)))

    done = asyncio.run(crowd(40))
    assert all(durable and in_file for _, durable, in_file in done)
    assert 1 <= snaps.status()["group_commits"] < 40  # shared transactions
    faulty.error = FULL
    assert [durable for _, durable, _ in asyncio.run(crowd(3))] == [False] * 3
    assert snaps.status()["not_durable"] == 3 and snaps.status()["durable"] is False
    faulty.error = None
    snaps.write()  # the periodic snapshot's retry puts the changes down, and persist is durable again
    assert saved_ids(db.path) == {r.id for r in store.all_records()} and asyncio.run(crowd(1))[0][1] is True


@pytest.mark.parametrize("policy", ["always", "everysec", "os"])
def test_every_fsync_policy_writes_before_it_answers(tmp_path, policy):
    db = SessionDB(tmp_path / "s.sqlite3", {"tiny@v1": FINGERPRINT}, fsync=policy)
    store = MemorySessionStore(100)
    snaps = Snapshots(db, store, interval_s=3600.0)
    snaps.load()
    sid = store.create(record()).id
    assert asyncio.run(snaps.persist()) and saved_ids(db.path) == {sid}
    snaps.sync()  # everysec's fsync of the write-ahead log; a no-op once synced
    assert snaps.status()["fsync"] == policy and snaps.status()["state"] == "ok"
    with contextlib.closing(sqlite3.connect(db.path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_an_unknown_fsync_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fsync policy 'sometimes'"):
        SessionDB(tmp_path / "s.sqlite3", {"tiny@v1": FINGERPRINT}, fsync="sometimes")


def test_the_first_snapshot_on_a_full_disk_leaves_nothing_behind(faulty, tmp_path):
    db = SessionDB(tmp_path / "s.sqlite3", {"tiny@v1": FINGERPRINT})
    snaps = Snapshots(db, store_with(3), interval_s=1.0)
    snaps.load()
    faulty.error = FULL
    snaps.write()
    assert not db.path.exists() and [p.name for p in tmp_path.iterdir()] == ["s.sqlite3.lock"]  # no half-built file
    assert snaps.status()["state"] == "degraded"
    faulty.error = None
    snaps.write()
    assert len(saved_ids(db.path)) == 3


def test_a_file_that_cannot_be_read_now_is_kept_and_read_once_it_can(faulty, tmp_path, caplog):
    db = SessionDB(tmp_path / "s.sqlite3", {"tiny@v1": FINGERPRINT})
    before = Snapshots(db, store_with(20), interval_s=1.0)
    before.load()
    before.write()
    good = saved_ids(db.path)
    faulty.error = IOERR  # opening the file fails, as on the full disk of the finding
    store = MemorySessionStore(100)
    snaps = Snapshots(db, store, interval_s=1.0)
    assert snaps.load() == 0 and not snaps.loaded
    assert db.path.exists() and not list(tmp_path.glob("*.corrupt-*"))  # not renamed aside
    made = store.create(record()).id
    snaps.write()  # nothing is written while the file's own sessions are unread
    assert saved_ids(db.path) == good and snaps.status()["state"] == "degraded"
    shutdown = Snapshots(db, MemorySessionStore(100), interval_s=1.0)
    assert shutdown.final() == 0 and saved_ids(db.path) == good  # a shutdown on the broken disk changes nothing
    faulty.error = None
    snaps.write()
    assert snaps.loaded and snaps.restored == 20 and store.count() == 21
    assert saved_ids(db.path) == good | {made}
    assert not [r for r in caplog.records if "corrupt" in r.getMessage()]  # no corruption was reported


def test_a_folder_that_cannot_be_made_now_degrades_instead_of_failing_the_start(tmp_path):
    """The lock file cannot be created (here its folder's place is taken by a file): no crash, a retry."""
    blocked = tmp_path / "state"
    blocked.write_text("not a folder")
    db = SessionDB(blocked / "s.sqlite3", {"tiny@v1": FINGERPRINT})
    assert Snapshots(db, store_with(1), interval_s=1.0).final() == 0 and blocked.read_text() == "not a folder"
    snaps = Snapshots(db, store_with(2), interval_s=1.0)
    assert snaps.load() == 0 and not snaps.loaded and snaps.status()["state"] == "degraded"
    snaps.write()  # still blocked: another failure, nothing written
    assert snaps.status()["failures"] == 2 and blocked.read_text() == "not a folder"
    blocked.unlink()  # mended while the server runs: the loop's next write takes the file
    snaps.write()
    assert snaps.loaded and len(saved_ids(blocked / "s.sqlite3")) == 2 and snaps.status()["state"] == "ok"
    assert snaps.final() == 2


def test_only_real_corruption_sets_a_file_aside(tmp_path, caplog):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"this is not an SQLite database, though it has its name" * 100)
    snaps = Snapshots(SessionDB(path, {"tiny@v1": FINGERPRINT}), MemorySessionStore(10), interval_s=1.0)
    assert snaps.load() == 0 and snaps.loaded
    assert not path.exists() and [p.name.split("-")[0] for p in tmp_path.glob("s.sqlite3.corrupt*")] == ["s.sqlite3.corrupt"]
    assert any(r.levelname == "ERROR" and "SQLITE_NOTADB" in r.getMessage() for r in caplog.records)


def fill(folder: Path) -> Path:
    """Write zeros into `folder` until its file system has no space left."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs, as the finding used; mounting needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_loses_no_session_across_restarts(trained_store, small_disk):
    """The finding, on a real full disk: 20 saved sessions, the disk filled while the server runs, a
    restart on the full disk, space back, another restart: 20 of 20 come back and nothing was set aside."""
    db = small_disk / "s.sqlite3"
    srv = Server(trained_store, session_db=db, snapshot_interval_s=0.2)
    try:
        sids = [new_session(srv, f"KING:\n{'thou ' * (i % 5)}") for i in range(20)]
        wait_until(lambda: snapshots(srv) >= 1 and len(saved_ids(db)) == 20, what="20 sessions on disk")
        filler = fill(small_disk)
        made = []  # new sessions whose write needs pages the disk no longer has: each answers, and says whether it is durable
        for _ in range(30):
            r = httpx.post(srv.url + "/sessions", json={"prompt": "QUEEN:\n" + "sweet lady, " * 20, "seed": 3}, timeout=30)
            assert r.status_code == 201, r.text
            made.append(r.json()["durable"])
        assert made.count(False) >= 1 and set(made) <= {True, False}
        persistence = ready(srv)["session_store"]["persistence"]
        assert persistence["state"] == "degraded" and persistence["durable"] is False
        assert persistence["not_durable"] >= made.count(False)
        assert srv.metric("charlstm_session_changes_not_durable_total") == persistence["not_durable"]
        call = httpx.post(f"{srv.url}/sessions/{sids[0]}/generate", json={"max_new_tokens": 5}, timeout=30)
        assert call.status_code == 200 and call.json()["session"]["durable"] is False  # generation goes on; it says so
        # SQLite's own code (SQLITE_FULL, or SQLITE_IOERR_SHMSIZE where the SHM file cannot grow), never a masking ROLLBACK error
        assert persistence["last_error"].startswith(("SQLITE_FULL", "SQLITE_IOERR")) and "rollback" not in persistence["last_error"]
        assert srv.metric("charlstm_session_snapshot_failures_total", 'operation="write"') >= 1
        assert httpx.get(srv.url + "/info", timeout=5).json()["sessions"]["persistence"]["state"] == "degraded"
    finally:
        srv.stop()
    again = Server(trained_store, session_db=db, snapshot_interval_s=0.2)  # on the full disk
    try:
        assert not list(small_disk.glob("*.corrupt-*"))
        filler.unlink()  # space is back
        wait_until(lambda: ready(again)["session_store"]["persistence"]["loaded"], what="the saved sessions read")
        for sid in sids:
            assert httpx.get(f"{again.url}/sessions/{sid}", timeout=5).status_code == 200
    finally:
        again.stop()
    third = Server(trained_store, session_db=db)
    try:
        assert all(httpx.get(f"{third.url}/sessions/{sid}", timeout=5).status_code == 200 for sid in sids)
        assert not list(small_disk.glob("*.corrupt-*"))
    finally:
        third.stop()
