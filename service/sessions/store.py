"""The one interface every session store implements, changed only under a lease (records.py).

Policy lives in store operations (lease, commit, expiry, the LRU cap), never
in flags on shared Python objects, so the same rules hold for a store shared by several processes.
Every store passes the one contract suite in tests/session_store_contract.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from .records import Lease, SessionRecord


RemovalCallback = Callable[[str], None]  # called with "expired", "evicted" or "deleted"


class SessionStore(ABC):
    """Where sessions live. Every method may block (a network store): call them off the engine thread.

    Errors: SessionNotFound (unknown, expired or evicted), SessionBusy (leased by another call),
    TooManySessions (at the cap with every session leased), LeaseLost (commit or renew by a holder
    whose lease is no longer current). Anything else means the store itself failed."""

    kind = "abstract"

    def __init__(self, max_sessions: int, on_removed: RemovalCallback | None = None):
        self.max_sessions = max_sessions
        self.on_removed = on_removed or (lambda reason: None)

    @abstractmethod
    def create(self, record: SessionRecord) -> SessionRecord:
        """Insert a new session; at the cap the least recently used idle session is evicted first."""

    @abstractmethod
    def get(self, session_id: str) -> SessionRecord:
        """The committed record (a copy): a running call's changes are not in it until committed."""

    @abstractmethod
    def is_leased(self, session_id: str) -> bool: ...

    @abstractmethod
    def lease(self, session_id: str, lease_s: float) -> Lease:
        """Take the session for one call, atomically; SessionBusy while another live lease holds it."""

    @abstractmethod
    def renew(self, lease: Lease, lease_s: float) -> Lease:
        """Extend a live lease; LeaseLost when it is no longer this holder's."""

    @abstractmethod
    def commit(self, lease: Lease, record: SessionRecord) -> SessionRecord:
        """Store `record` as the next version and end the lease; only the current holder, only once."""

    @abstractmethod
    def release(self, lease: Lease) -> None:
        """End the lease without changing the state (the call did not complete); it counts as a use."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Remove an idle session; SessionBusy while leased."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Remove idle sessions past their TTL; returns how many. (A store may expire keys by itself.)"""

    @abstractmethod
    def count(self) -> int: ...

    def known_count(self) -> int:
        """A count that never waits (what a metrics scrape reads): a network store answers the last
        count it saw."""
        return self.count()

    def describe(self) -> dict:
        """What /ready shows about the store. Never waits on the store (a probe must not): a network
        store gives its known count."""
        return {"kind": self.kind, "sessions": self.known_count()}

    def serve(self, models: dict[str, str]) -> None:
        """The models served changed (name@version -> weights sha256): a shared store checks them against the
        other replicas' before its next operation; a store of this process alone has nothing to check."""

    def close(self) -> None:
        """Release what the store holds (connections, files, locks)."""
