"""The contract every session store passes. A store's test module subclasses `StoreContract` and
provides a `make_store(max_sessions)` fixture returning a fresh, empty store, and a `clock` fixture: the
time the store's TTLs and leases run on. An embedded store takes an injected clock (`FakeClock`), so its
TTL and lease tests are exact whatever the machine's speed; a shared store expires keys by its own clock
(Redis's), which only real time moves (`RealClock`, short TTLs)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from service.sessions.records import SessionRecord, new_session_id
from service.sessions.errors import LeaseLost, SessionBusy, SessionNotFound, TooManySessions

from .server import wait_until

FINGERPRINT = "ab" * 32
SHAPE = (2, 2, 8)  # (h and c, layers, hidden)
_rng = np.random.default_rng()


def randn() -> np.ndarray:
    """A random float32 state of SHAPE."""
    return _rng.standard_normal(SHAPE, dtype=np.float32)


def full(value: float) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.float32)


def same_state(a, b) -> bool:
    """Exactly equal: both numpy float32 arrays of one shape and the same values."""
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype == np.float32
            and a.shape == b.shape and np.array_equal(a, b))


class FakeClock:
    """A wall clock and a monotonic one that move only when a test says: `wall` and `monotonic` are the
    store's `clock` and `lease_clock`."""

    def __init__(self) -> None:
        self.now, self.mono = time.time(), time.monotonic()

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


class RealClock:
    """The store's own clock: time passes by waiting for it."""

    def wall(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)  # waiting for time itself to pass, which a shared store's TTLs are measured in


def record(ttl_s: float = 600.0, seed: int = 1, now: float | None = None, **fields) -> SessionRecord:
    now = time.time() if now is None else now
    values = dict(id=new_session_id(), state=randn(), seed=seed, counter=0, position=1, model=FINGERPRINT,
                  ttl_s=ttl_s, created_at=now, last_used=now)
    values.update(fields)
    return SessionRecord(**values)


class StoreContract:
    """Subclass with a `make_store` fixture, `make_store(max_sessions=10) -> SessionStore`, and a `clock`
    fixture (FakeClock or RealClock) that the stores it makes run on."""

    def test_create_then_get_returns_an_equal_copy(self, make_store):
        store = make_store()
        r = record(seed=42, counter=3, position=17)
        store.create(r)
        got = store.get(r.id)
        assert same_state(got.state, r.state) and (got.seed, got.counter, got.position) == (42, 3, 17)
        assert got.model == FINGERPRINT and got.ttl_s == r.ttl_s
        got.state[...] = 0  # a copy: changing it changes nothing stored
        assert same_state(store.get(r.id).state, r.state)
        assert store.count() == 1 and not store.is_leased(r.id)

    def test_unknown_sessions_are_not_found(self, make_store):
        store = make_store()
        for op in (store.get, store.is_leased, store.delete, lambda sid: store.lease(sid, 5)):
            with pytest.raises(SessionNotFound):
                op("no-such-session")

    def test_a_lease_is_exclusive_and_a_commit_advances_the_version(self, make_store):
        store = make_store()
        r = record()
        store.create(r)
        lease = store.lease(r.id, 30)
        assert store.is_leased(r.id) and same_state(lease.record.state, r.state)
        with pytest.raises(SessionBusy):
            store.lease(r.id, 30)
        with pytest.raises(SessionBusy):
            store.delete(r.id)
        new_state = randn()
        committed = store.commit(lease, lease.record.advanced(new_state, seed=9, counter=5, consumed=10))
        assert committed.version == lease.record.version + 1 and committed.position == r.position + 10
        got = store.get(r.id)
        assert same_state(got.state, new_state) and (got.seed, got.counter, got.version) == (9, 5, committed.version)
        assert not store.is_leased(r.id)
        with pytest.raises(LeaseLost):  # a lease commits once: another record under it is refused
            store.commit(lease, lease.record)

    def test_a_commit_repeated_after_a_lost_reply_reports_the_commit_it_made(self, make_store):
        """A client that lost the reply retries the same commit (same lease, version read and record):
        it already applied, so it succeeds and changes nothing; a stale holder's commit still fails."""
        store = make_store()
        r = record()
        store.create(r)
        lease = store.lease(r.id, 30)
        advanced = lease.record.advanced(randn(), seed=4, counter=7, consumed=3)
        first = store.commit(lease, advanced)
        again = store.commit(lease, advanced)
        assert again.version == first.version == r.version + 1 and same_state(again.state, advanced.state)
        assert store.get(r.id).version == first.version and not store.is_leased(r.id)
        later = store.lease(r.id, 30)
        store.commit(later, later.record.advanced(full(0.0), 1, 1, 1))
        with pytest.raises(LeaseLost):  # once another holder has committed, the old retry is stale
            store.commit(lease, advanced)
        assert same_state(store.get(r.id).state, full(0.0))

    def test_a_released_lease_leaves_the_state_and_frees_the_session(self, make_store):
        store = make_store()
        r = record()
        store.create(r)
        lease = store.lease(r.id, 30)
        store.release(lease)
        assert not store.is_leased(r.id) and same_state(store.get(r.id).state, r.state)
        assert store.get(r.id).version == r.version
        store.release(lease)  # releasing twice is harmless
        again = store.lease(r.id, 30)
        store.commit(again, again.record)

    def test_an_expired_lease_frees_the_session_and_cannot_commit(self, make_store, clock):
        store = make_store()
        r = record(now=clock.wall())
        store.create(r)
        dead = store.lease(r.id, 0.2)  # a holder that died
        clock.advance(0.3)
        wait_until(lambda: not store.is_leased(r.id), timeout=10, what="the lease to expire")
        with pytest.raises(LeaseLost):
            store.commit(dead, dead.record.advanced(full(0.0), 1, 1, 1))
        with pytest.raises(LeaseLost):
            store.renew(dead, 30)
        live = store.lease(r.id, 30)
        store.commit(live, live.record.advanced(full(1.0), 1, 1, 1))
        with pytest.raises(LeaseLost):  # the dead holder comes back: still refused, the newer commit stands
            store.commit(dead, dead.record)
        assert same_state(store.get(r.id).state, full(1.0))

    def test_renewal_keeps_a_lease_alive(self, make_store, clock):
        store = make_store()
        r = record(now=clock.wall())
        store.create(r)
        lease = store.lease(r.id, 0.5)
        for _ in range(15):  # renewing every 0.1 s, well within the lease, for three lease lengths
            lease = store.renew(lease, 0.5)
            assert store.is_leased(r.id)
            clock.advance(0.1)
        store.commit(lease, lease.record)

    def test_only_one_of_many_concurrent_leases_wins(self, make_store):
        store = make_store()
        r = record()
        store.create(r)
        wins, busy, barrier = [], [], threading.Barrier(8)

        def take():
            barrier.wait()
            try:
                wins.append(store.lease(r.id, 30))
            except SessionBusy:
                busy.append(1)

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(busy) == 7

    def test_delete_removes_and_reports(self, make_store):
        removed = []
        store = make_store(on_removed=removed.append)
        r = record()
        store.create(r)
        store.delete(r.id)
        with pytest.raises(SessionNotFound):
            store.get(r.id)
        assert store.count() == 0 and removed == ["deleted"]

    def test_idle_sessions_expire_after_their_ttl(self, make_store, clock):
        store = make_store()
        short, long = record(ttl_s=0.3, now=clock.wall()), record(ttl_s=600, now=clock.wall())
        store.create(short)
        store.create(long)
        clock.advance(0.4)

        def gone():
            store.purge_expired()
            try:
                store.get(short.id)
                return False
            except SessionNotFound:
                return True

        wait_until(gone, timeout=10, what="the short session to expire")
        assert store.get(long.id) and store.count() == 1

    def test_a_use_postpones_expiry(self, make_store, clock):
        store = make_store()
        r = record(ttl_s=1.0, now=clock.wall())
        store.create(r)
        for _ in range(10):  # used every 0.2 s for twice its TTL: it never expires
            lease = store.lease(r.id, 30)
            store.commit(lease, lease.record)
            clock.advance(0.2)
        assert store.get(r.id).version >= 10

    def test_the_cap_evicts_the_least_recently_used_idle_session(self, make_store, clock):
        removed = []
        store = make_store(max_sessions=3, on_removed=removed.append)
        made = []
        for _ in range(3):
            made.append(record(now=clock.wall()))
            store.create(made[-1])
            clock.advance(0.01)  # distinct last-use times, for stores that order by time
        a, b, c = made
        lease = store.lease(a.id, 30)  # a is the oldest but busy: b is evicted instead
        store.commit(lease, lease.record)  # ... and now a is the most recent
        clock.advance(0.01)
        d = record(now=clock.wall())
        store.create(d)
        assert removed == ["evicted"] and store.count() == 3
        with pytest.raises(SessionNotFound):
            store.get(b.id)
        for r in (a, c, d):
            assert store.get(r.id)

    def test_the_cap_never_evicts_a_leased_session(self, make_store):
        store = make_store(max_sessions=2)
        a, b = record(), record()
        store.create(a)
        store.create(b)
        la, lb = store.lease(a.id, 30), store.lease(b.id, 30)
        with pytest.raises(TooManySessions):
            store.create(record())
        store.release(la)
        store.create(record())
        with pytest.raises(SessionNotFound):
            store.get(a.id)
        store.commit(lb, lb.record)

    def test_a_leased_session_reads_as_last_committed(self, make_store):
        store = make_store()
        r = record()
        store.create(r)
        lease = store.lease(r.id, 30)
        assert same_state(store.get(r.id).state, r.state)  # a consistent snapshot while a call runs
        store.commit(lease, replace(lease.record, state=full(3.0)))
        assert same_state(store.get(r.id).state, full(3.0))
