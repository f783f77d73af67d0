"""Sessions on disk: an SQLite file written on graceful shutdown and periodically, read back at start.

A session is a fixed-size record (state floats, seed, counter, position, times), so the whole store
is small and each snapshot is one SQLite transaction: a crash leaves the previous snapshot intact.
A file that cannot be read is renamed aside (`*.corrupt-<time>`) and reported, never fatal.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .sessions import Session

log = logging.getLogger("charlstm.sessions")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    state BLOB NOT NULL,        -- float32 little-endian, shape (2, layers, hidden)
    layers INTEGER NOT NULL,
    hidden INTEGER NOT NULL,
    seed TEXT NOT NULL,         -- up to 2**63 - 1, kept exact as text
    counter INTEGER NOT NULL,
    position INTEGER NOT NULL,
    ttl_s REAL NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def state_to_bytes(state: torch.Tensor) -> bytes:
    return state.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


def state_from_bytes(blob: bytes, layers: int, hidden: int) -> torch.Tensor:
    arr = np.frombuffer(blob, dtype="<f4")
    if arr.size != 2 * layers * hidden:
        raise ValueError(f"state has {arr.size} floats, expected {2 * layers * hidden}")
    return torch.from_numpy(arr.astype(np.float32).reshape(2, layers, hidden).copy())


class SessionDB:
    def __init__(self, path: str | Path, model_key: str):
        """`model_key` names the model the states belong to; states of another model are not restored."""
        self.path, self.model_key = Path(path), model_key

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
            yield conn
        finally:
            conn.close()

    def load(self) -> list[Session]:
        """Every saved session of this model; a damaged file is moved aside and nothing is restored."""
        if not self.path.exists():
            return []
        try:
            with self._connect() as conn:
                if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("integrity check failed")
                row = conn.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
                if row is not None and row[0] != self.model_key:
                    log.warning("session store %s holds sessions of %s, not %s: not restored", self.path, row[0], self.model_key)
                    return []
                rows = conn.execute("SELECT id, state, layers, hidden, seed, counter, position, ttl_s, created_at, last_used FROM sessions").fetchall()
            return [Session(id=r[0], state=state_from_bytes(r[1], r[2], r[3]), seed=int(r[4]), counter=r[5], position=r[6],
                            ttl_s=r[7], created_at=r[8], last_used=r[9]) for r in rows]
        except (sqlite3.DatabaseError, ValueError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("session store %s is unreadable (%s); moved it to %s and starting with no sessions", self.path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    p.rename(Path(str(aside) + suffix))
            return []

    def write(self, changed: list[Session], removed: list[str], replace_all: bool = False) -> None:
        """Apply changes in one transaction: readers and crashes see the old snapshot or the new one."""
        rows = [(s.id, state_to_bytes(s.state), s.state.shape[1], s.state.shape[2], str(s.seed), s.counter, s.position,
                 s.ttl_s, s.created_at, s.last_used) for s in changed]
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if replace_all:
                    conn.execute("DELETE FROM sessions")
                conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in removed])
                conn.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?)", (self.model_key,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
