"""Sessions on disk: an SQLite file written on graceful shutdown and periodically, read back at start.

A session is a fixed-size record (state floats, seed, counter, position, version, times), so each
snapshot is one SQLite transaction: a crash leaves the previous snapshot intact, and the very first
snapshot is built under a temporary name and renamed into place, so the file never exists without
its tables. One live server owns a file (an exclusive lock held for the process's life), and a file
belongs to one model: another server, or a server of other weights, is refused at start with a
message that says what to do. A file that cannot be read is renamed aside and reported, never fatal.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .files import FILE_MODE, private_folder
from .records import SessionRecord

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
    last_used REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
COLUMNS = "id, state, layers, hidden, seed, counter, position, ttl_s, created_at, last_used, version"


class SessionDBError(Exception):
    """The file cannot be used by this server (held by another one, or written for another model)."""


def state_to_bytes(state: torch.Tensor) -> bytes:
    return state.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


def state_from_bytes(blob: bytes, layers: int, hidden: int) -> torch.Tensor:
    arr = np.frombuffer(blob, dtype="<f4")
    if arr.size != 2 * layers * hidden:
        raise ValueError(f"state has {arr.size} floats, expected {2 * layers * hidden}")
    return torch.from_numpy(arr.astype(np.float32).reshape(2, layers, hidden).copy())


class SessionDB:
    def __init__(self, path: str | Path, model: str, fingerprint: str):
        """`model` (name@version) and `fingerprint` (the weights' sha256) name the model the states belong to."""
        self.path, self.model, self.fingerprint = Path(path), model, fingerprint
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Take the file for this process, or refuse: another live server writes it."""
        private_folder(self.path.parent)
        lock_path = Path(f"{self.path}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SessionDBError(f"session database {self.path} is in use by another running server ({holder}); "
                                 "give each server its own file with CHARLSTM_SESSION_DB (or --session-db), "
                                 "or share sessions between servers with a shared session store") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        for suffix in ("", "-wal", "-shm"):  # a file an older version left readable by others
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", FILE_MODE)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the lock
            self._lock_fd = None

    @contextmanager
    def _connect(self, path: Path | None = None) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(path or self.path, timeout=10, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    def load(self) -> list[SessionRecord]:
        """Every saved session. Raises SessionDBError for a file of another model; a damaged file is
        moved aside and nothing is restored."""
        if not self.path.exists():
            return []
        try:
            with self._connect() as conn:
                if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("integrity check failed")
                conn.executescript(SCHEMA)
                self._check_model(dict(conn.execute("SELECT key, value FROM meta").fetchall()))
                cols = {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
                if "version" not in cols:  # a file from before versions: every session starts at version 0
                    conn.execute("ALTER TABLE sessions ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
                rows = conn.execute(f"SELECT {COLUMNS} FROM sessions").fetchall()
            return [SessionRecord(id=r[0], state=state_from_bytes(r[1], r[2], r[3]), seed=int(r[4]), counter=r[5],
                                  position=r[6], ttl_s=r[7], created_at=r[8], last_used=r[9], version=r[10],
                                  model=self.fingerprint) for r in rows]
        except (sqlite3.DatabaseError, ValueError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("session store %s is unreadable (%s); moved it to %s and starting with no sessions", self.path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    p.rename(Path(str(aside) + suffix))
            return []

    def _check_model(self, meta: dict[str, str]) -> None:
        saved_sha = meta.get("weights_sha256")
        if saved_sha is None and ":" in meta.get("model", ""):  # the older layout: name@version:sha16
            saved_sha = meta["model"].rsplit(":", 1)[1]
        if saved_sha is not None and not self.fingerprint.startswith(saved_sha):
            saved = meta.get("model", "?").split(":")[0]
            raise SessionDBError(f"session database {self.path} holds sessions of model {saved} (weights {saved_sha[:12]}), "
                                 f"but this server runs {self.model} (weights {self.fingerprint[:12]}): their states do not "
                                 "fit this model. Point CHARLSTM_SESSION_DB at another file, or move this one away")

    def write(self, changed: list[SessionRecord], removed: list[str], replace_all: bool = False) -> None:
        """Apply changes in one transaction: readers and crashes see the old snapshot or the new one."""
        rows = [(s.id, state_to_bytes(s.state), s.state.shape[1], s.state.shape[2], str(s.seed), s.counter, s.position,
                 s.ttl_s, s.created_at, s.last_used, s.version) for s in changed]
        if not self.path.exists():  # the first snapshot: build it aside, so the file appears complete
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))  # SQLite gives its WAL and SHM this mode
            os.chmod(tmp, FILE_MODE)  # whatever the umask
            with self._connect(tmp) as conn:
                self._apply(conn, rows, [], False)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            os.replace(tmp, self.path)
            for suffix in ("-wal", "-shm"):
                Path(str(tmp) + suffix).unlink(missing_ok=True)
            return
        with self._connect() as conn:
            self._apply(conn, rows, removed, replace_all)

    def _apply(self, conn: sqlite3.Connection, rows: list[tuple], removed: list[str], replace_all: bool) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:  # the schema statement by statement, inside the transaction (executescript would commit first)
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            if replace_all:
                conn.execute("DELETE FROM sessions")
            conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in removed])
            conn.executemany(f"INSERT OR REPLACE INTO sessions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [("model", self.model), ("weights_sha256", self.fingerprint)])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
