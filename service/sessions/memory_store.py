"""The embedded session store: records in this process's memory, in least-recently-used order.

One lock makes each operation atomic. Leases are tokens with a deadline on the monotonic clock;
TTLs use the wall clock, since a record's times are wall-clock times that survive a restart. The
store remembers what changed since the last snapshot, so `SessionDB` writes only that.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from .records import Lease, SessionRecord
from .store import RemovalCallback, SessionStore
from .errors import LeaseLost, SessionBusy, SessionNotFound, TooManySessions


class MemorySessionStore(SessionStore):
    kind = "memory"

    def __init__(self, max_sessions: int, on_removed: RemovalCallback | None = None,
                 clock: Callable[[], float] = time.time, lease_clock: Callable[[], float] = time.monotonic):
        super().__init__(max_sessions, on_removed)
        self.clock, self.lease_clock = clock, lease_clock
        self._lock = threading.Lock()
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()  # least recently used first
        self._leases: dict[str, tuple[str, float]] = {}  # id -> (token, deadline on lease_clock)
        self._last_commit: dict[str, str] = {}  # id -> the lease token of the commit that made its version
        self._dirty: set[str] = set()  # changed since the last snapshot
        self._removed: set[str] = set()  # gone since the last snapshot
        self.snapshots = 0  # snapshots completed (SessionDB reports them here)
        self.last_snapshot_at: float | None = None

    # ------------------------------------------------------------------ the interface
    def create(self, record: SessionRecord) -> SessionRecord:
        with self._lock:
            if record.id in self._records:
                raise ValueError(f"session {record.id!r} exists already")
            if len(self._records) >= self.max_sessions:
                victim = next((sid for sid in self._records if not self._leased(sid)), None)
                if victim is None:
                    raise TooManySessions(f"all {self.max_sessions} sessions are in use")
                self._remove(victim, "evicted")
            return self._put(replace(record, state=record.state.copy(), last_used=self.clock()))

    def get(self, session_id: str) -> SessionRecord:
        with self._lock:
            return self._copy(self._live(session_id))

    def is_leased(self, session_id: str) -> bool:
        with self._lock:
            self._live(session_id)
            return self._leased(session_id)

    def lease(self, session_id: str, lease_s: float) -> Lease:
        with self._lock:
            record = self._live(session_id)
            if self._leased(session_id):
                raise SessionBusy(f"session {session_id} is already generating; wait for that call to finish")
            token, deadline = secrets.token_hex(16), self.lease_clock() + lease_s
            self._leases[session_id] = (token, deadline)
            return Lease(session_id, token, self._copy(record), deadline)

    def renew(self, lease: Lease, lease_s: float) -> Lease:
        with self._lock:
            self._holder(lease)
            deadline = self.lease_clock() + lease_s
            self._leases[lease.session_id] = (lease.token, deadline)
            return replace(lease, expires_at=deadline)

    def commit(self, lease: Lease, record: SessionRecord) -> SessionRecord:
        with self._lock:
            current = self._records.get(lease.session_id)
            if current is not None and self._repeats_last_commit(lease, record, current):
                return self._copy(current)  # a retry of the commit that made this version
            current = self._holder(lease)
            if current.version != lease.record.version:
                raise LeaseLost(f"session {lease.session_id} changed since it was leased")
            del self._leases[lease.session_id]
            new = replace(record, id=lease.session_id, state=record.state.copy(), version=current.version + 1,
                          created_at=current.created_at, last_used=self.clock())
            self._last_commit[lease.session_id] = lease.token
            return self._copy(self._put(new))

    def release(self, lease: Lease) -> None:
        with self._lock:
            held = self._leases.get(lease.session_id)
            if held is None or held[0] != lease.token:
                return  # expired meanwhile, or released already: nothing of ours to drop
            del self._leases[lease.session_id]
            current = self._records.get(lease.session_id)
            if current is not None:
                self._put(replace(current, last_used=self.clock()))

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._live(session_id)
            if self._leased(session_id):
                raise SessionBusy(f"session {session_id} is generating; delete it when the call has finished")
            self._remove(session_id, "deleted")

    def purge_expired(self) -> int:
        with self._lock:
            now = self.clock()
            gone = [sid for sid, r in self._records.items() if r.expires_at <= now and not self._leased(sid)]
            for sid in gone:
                self._remove(sid, "expired")
            return len(gone)

    def count(self) -> int:
        with self._lock:
            return len(self._records)

    def describe(self) -> dict:
        with self._lock:
            return {"kind": self.kind, "sessions": len(self._records), "snapshots": self.snapshots,
                    "last_snapshot_at": self.last_snapshot_at}

    # ------------------------------------------------------------------ persistence (SessionDB)
    def take_changes(self) -> tuple[list[SessionRecord], list[str]]:
        """Records changed and ids removed since the last call. A leased session is written as last
        committed: a running call's changes exist only once it commits."""
        with self._lock:
            changed = [self._records[i] for i in self._dirty if i in self._records]
            removed = list(self._removed)
            self._dirty.clear()
            self._removed.clear()
            return changed, removed

    def all_records(self) -> list[SessionRecord]:
        with self._lock:
            return list(self._records.values())

    def restore(self, records: list[SessionRecord]) -> int:
        """Put back saved sessions that have not expired: the most recently used first, up to the cap.
        A late restore (the file could not be read at start) joins the sessions made since, older than
        all of them in the LRU order, and never replaces one."""
        now = self.clock()
        live = sorted((r for r in records if r.expires_at > now), key=lambda r: r.last_used, reverse=True)
        with self._lock:
            live = [r for r in live if r.id not in self._records]
            keep = live[: max(0, self.max_sessions - len(self._records))]
            newer = list(self._records.items())
            self._records.clear()
            for r in reversed(keep):  # oldest first, so the LRU order ends with the most recent
                self._records[r.id] = r
            self._records.update(newer)
        return len(keep)

    def snapshot_done(self) -> None:
        with self._lock:
            self.snapshots += 1
            self.last_snapshot_at = self.clock()

    # ------------------------------------------------------------------ under the lock
    def _live(self, session_id: str) -> SessionRecord:
        record = self._records.get(session_id)
        if record is None:
            raise SessionNotFound(f"session {session_id!r} does not exist, has expired or was evicted")
        if record.expires_at <= self.clock() and not self._leased(session_id):
            self._remove(session_id, "expired")
            raise SessionNotFound(f"session {session_id!r} does not exist, has expired or was evicted")
        return record

    def _repeats_last_commit(self, lease: Lease, record: SessionRecord, current: SessionRecord) -> bool:
        """The commit that made `current`, sent again by its holder: same token, the version it read, the same values."""
        return (self._last_commit.get(lease.session_id) == lease.token and current.version == lease.record.version + 1
                and np.array_equal(current.state, record.state)
                and (current.seed, current.counter, current.position, current.ttl_s) == (record.seed, record.counter, record.position, record.ttl_s))

    def _leased(self, session_id: str) -> bool:
        held = self._leases.get(session_id)
        if held is not None and held[1] <= self.lease_clock():
            del self._leases[session_id]  # its holder forgot it or died: it expires by itself
            return False
        return held is not None

    def _holder(self, lease: Lease) -> SessionRecord:
        """The current record, if `lease` is the session's live lease."""
        record = self._records.get(lease.session_id)
        held = self._leases.get(lease.session_id)
        if record is None or held is None or held[0] != lease.token or held[1] <= self.lease_clock():
            raise LeaseLost(f"the lease on session {lease.session_id} expired or was taken by another call")
        return record

    def _put(self, record: SessionRecord) -> SessionRecord:
        self._records[record.id] = record
        self._records.move_to_end(record.id)
        self._dirty.add(record.id)
        self._removed.discard(record.id)
        return record

    def _remove(self, session_id: str, reason: str) -> None:
        self._records.pop(session_id, None)
        self._last_commit.pop(session_id, None)
        self._leases.pop(session_id, None)
        self._dirty.discard(session_id)
        self._removed.add(session_id)
        try:
            self.on_removed(reason)
        except Exception:  # a metrics callback must not break the store
            pass

    @staticmethod
    def _copy(record: SessionRecord) -> SessionRecord:
        return replace(record, state=record.state.copy())
