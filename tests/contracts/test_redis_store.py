"""The Redis store passes the store contract against a real redis-server, keeps its sessions in the
portable blob format, and refuses a replica of other weights or another session key."""

from __future__ import annotations

import asyncio

import pytest

from service.sessions import blob as session_blob
from service.sessions.redis_store import RedisSessionStore, StoreMismatch
from service.sessions.errors import SessionStoreUnavailable

from ..session_store_contract import FINGERPRINT, RealClock, StoreContract, full, record, same_state

KEY = b"k" * 32


@pytest.fixture
def make_store(redis_server):
    """A fresh, empty store on a flushed database; every store made is closed after the test."""
    redis_server.client().flushdb()
    made = []

    def make(max_sessions: int = 10, on_removed=None, key: bytes = KEY, fingerprint: str = FINGERPRINT):
        store = RedisSessionStore(redis_server.url, max_sessions, on_removed, key=key, models={"tiny@v1": fingerprint})
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


class TestRedisStore(StoreContract):
    @pytest.fixture
    def clock(self):
        return RealClock()  # Redis expires keys by its own clock


def test_a_session_is_stored_as_a_portable_blob(make_store, redis_server):
    store = make_store()
    r = record(seed=5, counter=2, position=9)
    store.create(r)
    blob = redis_server.client().hget(f"charlstm:session:{r.id}", "blob")
    value = session_blob.decode(blob, KEY, fingerprint=FINGERPRINT)
    assert same_state(value.state, r.state) and (value.seed, value.counter, value.position) == (5, 2, 9)


def test_idle_expiry_is_redis_key_expiry_refreshed_by_use(make_store, redis_server):
    store = make_store()
    r = record(ttl_s=100.0)
    store.create(r)
    key = f"charlstm:session:{r.id}"
    assert 90_000 < redis_server.client().pttl(key) <= 100_000
    lease = store.lease(r.id, 1000)  # a lease longer than the TTL keeps the session at least that long
    assert redis_server.client().pttl(key) > 900_000
    store.commit(lease, lease.record)  # the commit is the use: one TTL from now again
    assert 90_000 < redis_server.client().pttl(key) <= 100_000


def test_two_stores_on_one_redis_share_sessions_and_leases(make_store):
    a, b = make_store(), make_store()
    r = record()
    a.create(r)
    lease = b.lease(r.id, 30)
    with pytest.raises(Exception) as busy:
        a.lease(r.id, 30)
    assert busy.value.type == "session_busy"
    b.commit(lease, lease.record.advanced(full(1.0), 3, 4, 5))
    got = a.get(r.id)
    assert same_state(got.state, full(1.0)) and got.version == 1 and got.position == r.position + 5


def test_a_replica_of_other_weights_is_refused(make_store):
    make_store().claim()
    other = make_store(fingerprint="cd" * 32)
    with pytest.raises(StoreMismatch, match="holds sessions of model tiny@v1 with weights abababababab.*cdcdcdcdcdcd"):
        other.claim()


def test_a_replica_with_another_session_key_is_refused(make_store):
    make_store().claim()
    with pytest.raises(StoreMismatch, match="CHARLSTM_SESSION_KEY"):
        make_store(key=b"x" * 32).claim()


def test_an_unreachable_redis_fails_fast_and_defers_the_marker_check():
    from service.sessions.calls import SessionCalls

    from ..server import free_port

    store = RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0", 10, key=KEY, models={"tiny@v1": FINGERPRINT}, timeout_s=0.5)
    assert store.claim() is False  # the replica starts for plain generation
    observed = []
    calls = SessionCalls(store, lease_s=5, default_ttl_s=60, observe=lambda *a: observed.append(a))
    with pytest.raises(SessionStoreUnavailable, match="unavailable"):
        asyncio.run(calls.run("get", store.get, "anything"))
    assert [(op, failed) for op, _, failed in observed] == [("get", True)]
    store.close()
