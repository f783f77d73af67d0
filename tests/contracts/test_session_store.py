"""The embedded store passes the store contract; its snapshots restore the most recently used sessions."""

from __future__ import annotations

import time

import pytest

from service.sessions.memory_store import MemorySessionStore
from service.sessions.snapshots import SessionDB, SessionDBError

from ..session_store_contract import FINGERPRINT, FakeClock, StoreContract, record, same_state


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def clock(self):
        return FakeClock()

    @pytest.fixture
    def make_store(self, clock):
        def make(max_sessions: int = 10, on_removed=None):
            return MemorySessionStore(max_sessions, on_removed, clock=clock.wall, lease_clock=clock.monotonic)

        return make


def test_restore_keeps_the_most_recently_used_sessions_at_a_lowered_cap():
    now = time.time()
    saved = [record(last_used=now - 100 + i) for i in range(10)]  # saved[9] is the most recent
    store = MemorySessionStore(max_sessions=4)
    assert store.restore(saved) == 4
    kept = {r.id for r in store.all_records()}
    assert kept == {r.id for r in saved[-4:]}
    store.create(record())  # and the LRU order is right: the oldest of the kept goes first
    assert saved[-4].id not in {r.id for r in store.all_records()}


def test_restore_drops_expired_sessions():
    now = time.time()
    fresh, stale = record(ttl_s=600, last_used=now), record(ttl_s=10, last_used=now - 60)
    store = MemorySessionStore(10)
    assert store.restore([fresh, stale]) == 1 and store.count() == 1


def test_a_snapshot_round_trips_and_its_file_appears_complete(tmp_path):
    path = tmp_path / "s.sqlite3"
    db = SessionDB(path, {"m@v1": FINGERPRINT})
    db.open()
    records = [record(seed=i, counter=i, position=i + 1) for i in range(3)]
    db.write(records, [])
    assert path.exists() and not list(tmp_path.glob(".*tmp*"))
    loaded = {r.id: r for r in db.load()}
    for r in records:
        got = loaded[r.id]
        assert same_state(got.state, r.state) and (got.seed, got.counter, got.position) == (r.seed, r.counter, r.position)
    db.write([], [records[0].id])
    assert {r.id for r in db.load()} == {r.id for r in records[1:]}
    db.close()


def test_one_live_server_owns_a_session_database(tmp_path):
    path = tmp_path / "s.sqlite3"
    first = SessionDB(path, {"m@v1": FINGERPRINT})
    first.open()
    second = SessionDB(path, {"m@v1": FINGERPRINT})
    with pytest.raises(SessionDBError, match="in use by another running server"):
        second.open()
    first.close()
    second.open()  # the lock goes with its holder
    second.close()


def test_a_database_of_other_weights_is_refused(tmp_path):
    path = tmp_path / "s.sqlite3"
    db = SessionDB(path, {"m@v1": FINGERPRINT})
    db.write([record()], [])
    other = SessionDB(path, {"m@v2": "cd" * 32})
    with pytest.raises(SessionDBError, match="m@v1.*m@v2"):
        other.load()
