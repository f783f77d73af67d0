"""Stateful sessions: a fixed-size LSTM state plus a random generator, kept between calls.

`SessionStore` is the narrow storage interface (an in-memory LRU here; a Redis or on-disk store
can stand behind the same five methods). `SessionManager` adds the policy on top: unguessable ids,
idle TTL, a cap with least-recently-used eviction, and the busy flag that keeps two calls off one
session at a time.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .types import SessionBusy, SessionNotFound, TooManySessions


@dataclass
class Session:
    id: str
    state: torch.Tensor  # (2, L, H): h and c of every layer
    seed: int
    counter: int  # random draws made so far: the generator's position
    position: int  # characters consumed so far
    ttl_s: float
    created_at: float  # wall clock, seconds
    last_used: float  # wall clock, seconds
    busy: bool = False

    @property
    def expires_at(self) -> float:
        return self.last_used + self.ttl_s

    def metadata(self) -> dict:
        return {"session_id": self.id, "position": self.position, "seed": self.seed, "created_at": self.created_at,
                "last_used": self.last_used, "expires_at": self.expires_at, "ttl_seconds": self.ttl_s, "busy": self.busy}


class SessionStore(Protocol):
    def get(self, session_id: str) -> Session | None: ...
    def put(self, session: Session) -> None: ...
    def delete(self, session_id: str) -> bool: ...
    def __len__(self) -> int: ...
    def by_last_use(self) -> Iterator[Session]: ...  # least recently used first


class InMemorySessionStore:
    """Sessions in a dict kept in least-recently-used order."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str) -> Session | None:
        return self._items.get(session_id)

    def put(self, session: Session) -> None:
        self._items[session.id] = session
        self._items.move_to_end(session.id)

    def delete(self, session_id: str) -> bool:
        return self._items.pop(session_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)

    def by_last_use(self) -> Iterator[Session]:
        return iter(self._items.values())


class SessionManager:
    """Thread-safe policy over a store. Every public method takes the one lock."""

    def __init__(self, store: SessionStore, max_sessions: int, default_ttl_s: float,
                 on_evict: Callable[[str], None] = lambda reason: None, clock: Callable[[], float] = time.time):
        self.store, self.max_sessions, self.default_ttl_s = store, max_sessions, default_ttl_s
        self.on_evict, self.clock = on_evict, clock
        self._lock = threading.Lock()
        self._dirty: set[str] = set()  # changed since the last snapshot
        self._removed: set[str] = set()  # gone since the last snapshot

    def __len__(self) -> int:
        with self._lock:
            return len(self.store)

    def create(self, state: torch.Tensor, seed: int, ttl_s: float | None) -> Session:
        """A new session, busy until its priming call releases it."""
        with self._lock:
            if len(self.store) >= self.max_sessions:
                victim = next((s for s in self.store.by_last_use() if not s.busy), None)
                if victim is None:
                    raise TooManySessions(f"all {self.max_sessions} sessions are in use")
                self._remove(victim.id)
                self.on_evict("evicted")
            now = self.clock()
            session = Session(id=secrets.token_urlsafe(24), state=state, seed=seed, counter=0, position=0,
                              ttl_s=float(ttl_s or self.default_ttl_s), created_at=now, last_used=now, busy=True)
            self.store.put(session)
            return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            return self._live(session_id)

    def acquire(self, session_id: str) -> Session:
        """Mark a session busy for one call; a second concurrent call is refused, never interleaved."""
        with self._lock:
            session = self._live(session_id)
            if session.busy:
                raise SessionBusy(f"session {session_id} is already generating; wait for that call to finish")
            session.busy = True
            return session

    def release(self, session: Session, state: torch.Tensor | None = None, counter: int | None = None,
                consumed: int = 0, seed: int | None = None) -> None:
        """End a call: store the advanced state (or leave it as it was when the call did not complete)."""
        with self._lock:
            if state is not None:
                session.state = state
                session.counter = counter if counter is not None else session.counter
                session.seed = seed if seed is not None else session.seed
                session.position += consumed
            session.busy = False
            session.last_used = self.clock()
            if self.store.get(session.id) is session:
                self.store.put(session)  # refresh its place in the LRU order
                self._dirty.add(session.id)

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._live(session_id)
            if session.busy:
                raise SessionBusy(f"session {session_id} is generating; delete it when the call has finished")
            self._remove(session_id)

    def purge_expired(self) -> int:
        with self._lock:
            return self._purge_expired()

    def _live(self, session_id: str) -> Session:
        session = self.store.get(session_id)
        if session is None:
            raise SessionNotFound(f"session {session_id!r} does not exist, has expired or was evicted")
        if not session.busy and session.expires_at <= self.clock():
            self._remove(session_id)
            self.on_evict("expired")
            raise SessionNotFound(f"session {session_id!r} does not exist, has expired or was evicted")
        return session

    def _purge_expired(self) -> int:
        now, gone = self.clock(), 0
        for s in list(self.store.by_last_use()):
            if not s.busy and s.expires_at <= now:
                self._remove(s.id)
                self.on_evict("expired")
                gone += 1
        return gone

    def _remove(self, session_id: str) -> None:
        self.store.delete(session_id)
        self._dirty.discard(session_id)
        self._removed.add(session_id)

    # ------------------------------------------------------------------ persistence
    def take_changes(self) -> tuple[list[Session], list[str]]:
        """Sessions changed and ids removed since the last call, for a snapshot. Busy sessions are
        written with their state before the running call (it changes only when the call completes)."""
        with self._lock:
            changed = [replace(s, busy=False) for i in self._dirty if (s := self.store.get(i)) is not None]
            removed = list(self._removed)
            self._dirty.clear()
            self._removed.clear()
            return changed, removed

    def all_sessions(self) -> list[Session]:
        with self._lock:
            return [replace(s, busy=False) for s in self.store.by_last_use()]

    def restore(self, sessions: list[Session]) -> int:
        """Put back saved sessions that have not expired meanwhile; returns how many."""
        now, count = self.clock(), 0
        with self._lock:
            for s in sorted(sessions, key=lambda s: s.last_used):
                if s.expires_at > now and len(self.store) < self.max_sessions:
                    s.busy = False
                    self.store.put(s)
                    count += 1
        return count
