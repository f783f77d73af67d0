"""Sessions on disk: an SQLite file written before a session call is acknowledged, read back at start.

Every change a client is told about (a commit, a new session, a deletion) is in the file before its
answer goes out: `Snapshots.persist` is a group commit, so the calls that end while one transaction is
being written share the next one, and the cost per call stays small under load. How far the write
goes before the answer is the `session_fsync` policy, as Redis's `appendfsync`:
- `always`: the write-ahead log is fsynced in each transaction; a killed process or a lost machine
  loses nothing that was acknowledged.
- `everysec`: the log reaches the OS before the answer and the disk within a second: a killed process
  loses nothing, a lost machine (power, kernel) up to a second.
- `os`: the log reaches the OS before the answer, the disk when the OS or a checkpoint writes it: a
  killed process loses nothing, a lost machine what the OS had not written.
Changes no client waits on (a lease given back, an expiry) go into a snapshot every `interval_s`.

A session is a fixed-size record (state floats, seed, counter, position, version, times), so each
write is one SQLite transaction: a crash leaves the previous snapshot intact, and the very first
snapshot is built under a temporary name and renamed into place, so the file never exists without
its tables. One live server owns a file (an exclusive lock held for the process's life). Each row
names the weights its state belongs to, so one file holds the sessions of every model a server
serves; a file with a session of weights this server does not serve is refused at start with a
message that says what to do (a file of the one-model layout names its weights once, in meta).

A failure degrades instead of discarding. Only real corruption (SQLITE_CORRUPT, SQLITE_NOTADB, a
failed quick_check) sets a file aside, at error level. Anything else (a full disk, a read-only or
failing device, a lock) leaves the file as it is: the sessions stay in memory, `Snapshots` retries
with backoff, counts the failure and reports the degraded state, and a load that failed at start is
retried until it succeeds, so the saved sessions come back once the disk does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..engine.engine import EngineStats
from ..engine.observers import Fanout

from .files import FILE_MODE, private_folder
from .records import SessionRecord

log = logging.getLogger("charlstm.sessions")

FSYNC_POLICIES = ("always", "everysec", "os")  # the session_fsync setting (module docstring)
SYNCHRONOUS = {"always": "FULL", "everysec": "NORMAL", "os": "NORMAL"}  # SQLite's, in WAL mode: FULL syncs at each commit

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
    version INTEGER NOT NULL DEFAULT 0,
    weights TEXT NOT NULL DEFAULT ''  -- sha256 of the weights the state belongs to
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
COLUMNS = "id, state, layers, hidden, seed, counter, position, ttl_s, created_at, last_used, version, weights"


def _json_dict(text: str | None) -> dict[str, str]:
    """meta's `models` (weights sha256 -> name@version of every model whose sessions the file held)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class SessionDBError(Exception):
    """The file cannot be used by this server (held by another one, or written for another model)."""


class SnapshotUnavailable(Exception):
    """The file cannot be read or written now (no space, read-only, an I/O error, a lock); it is intact
    as far as anyone knows, and the operation may succeed later."""


CORRUPTION_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB: the primary result codes of a damaged file


def is_corruption(e: BaseException) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in CORRUPTION_CODES


def describe(e: BaseException) -> str:
    """The real error, with SQLite's code name when it has one ("SQLITE_FULL: database or disk is full")."""
    name = getattr(e, "sqlite_errorname", None)
    return f"{name}: {e}" if name else f"{type(e).__name__}: {e}"


def state_to_bytes(state: np.ndarray) -> bytes:
    return np.asarray(state, dtype=np.float32).astype("<f4").tobytes()


def state_from_bytes(blob: bytes, layers: int, hidden: int) -> np.ndarray:
    arr = np.frombuffer(blob, dtype="<f4")
    if arr.size != 2 * layers * hidden:
        raise ValueError(f"state has {arr.size} floats, expected {2 * layers * hidden}")
    return arr.astype(np.float32).reshape(2, layers, hidden)  # a copy: astype never returns the buffer's own view


class SessionDB:
    connection_class = sqlite3.Connection  # the tests put a fault-injecting subclass here

    def __init__(self, path: str | Path, models: dict[str, str], fsync: str = "always"):
        """`models`: name@version -> weights sha256 of every model this server serves. `fsync`: one of
        FSYNC_POLICIES (module docstring)."""
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy {fsync!r}: one of {', '.join(FSYNC_POLICIES)}")
        self.path, self.models, self.fsync = Path(path), dict(models), fsync
        self._lock_fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> None:
        """Take the file for this process, or refuse: another live server writes it (SessionDBError).
        A disk that cannot hold the lock file now raises SnapshotUnavailable."""
        try:
            private_folder(self.path.parent)
            fd = os.open(Path(f"{self.path}.lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise SnapshotUnavailable(f"session database {self.path} cannot be opened now ({describe(e)})") from e
        with contextlib.suppress(OSError):
            os.fchmod(fd, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SessionDBError(f"session database {self.path} is in use by another running server ({holder}); "
                                 "give each server its own file with CHARLSTM_SESSION_DB (or --session-db), "
                                 "or share sessions between servers with a shared session store") from None
        self._lock_fd = fd
        with contextlib.suppress(OSError):  # who holds it, for the message above; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        for suffix in ("", "-wal", "-shm"):  # a file an older version left readable by others
            with contextlib.suppress(OSError):
                os.chmod(f"{self.path}{suffix}", FILE_MODE)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the lock
            self._lock_fd = None

    @contextmanager
    def _connect(self, path: Path | None = None) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(path or self.path, timeout=10, isolation_level=None, factory=self.connection_class)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.fsync]}")
            yield conn
        finally:
            conn.close()

    def load(self) -> list[SessionRecord]:
        """Every saved session. Raises SessionDBError for a file of another model, SnapshotUnavailable
        when the file cannot be read now (it is left as it is); a corrupt file is moved aside and
        nothing is restored."""
        if not self.path.exists():
            return []
        try:
            with self._connect() as conn:
                check = conn.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    return self._set_aside(f"quick_check: {check}")
                conn.executescript(SCHEMA)
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                cols = {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
                if "version" not in cols:  # a file from before versions: every session starts at version 0
                    conn.execute("ALTER TABLE sessions ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
                if "weights" not in cols:  # the one-model layout: every row is of the weights meta names
                    conn.execute("ALTER TABLE sessions ADD COLUMN weights TEXT NOT NULL DEFAULT ''")
                rows = conn.execute(f"SELECT {COLUMNS} FROM sessions").fetchall()
            rows = [(*r[:11], r[11] or self._file_weights(meta)) for r in rows]
            self._check_models({r[11] for r in rows}, meta)
            return [SessionRecord(id=r[0], state=state_from_bytes(r[1], r[2], r[3]), seed=int(r[4]), counter=r[5],
                                  position=r[6], ttl_s=r[7], created_at=r[8], last_used=r[9], version=r[10],
                                  model=r[11]) for r in rows]
        except ValueError as e:  # a row whose state has another size than its own columns say
            return self._set_aside(str(e))
        except sqlite3.Error as e:
            if is_corruption(e):
                return self._set_aside(describe(e))
            raise SnapshotUnavailable(f"session database {self.path} cannot be read now ({describe(e)}); "
                                      "it is left as it is and read again later") from e

    def _set_aside(self, why: str) -> list[SessionRecord]:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        try:
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    p.rename(Path(str(aside) + suffix))
        except OSError as e:
            raise SnapshotUnavailable(f"session database {self.path} is corrupt ({why}) and cannot be moved aside: {e}") from e
        log.error("session database %s is corrupt (%s); moved it to %s and starting with no sessions", self.path, why, aside)
        return []

    def _file_weights(self, meta: dict[str, str]) -> str:
        """The weights a file of the one-model layout names (its meta), as a full sha256 where this server serves it."""
        saved = meta.get("weights_sha256")
        if saved is None and ":" in meta.get("model", ""):  # the oldest layout: name@version:sha16
            saved = meta["model"].rsplit(":", 1)[1]
        if not saved:
            return ""
        return next((sha for sha in self.models.values() if sha.startswith(saved)), saved)

    def _check_models(self, weights: set[str], meta: dict[str, str]) -> None:
        """Every saved session must be of weights this server serves: a state of other weights does not fit."""
        served = set(self.models.values())
        foreign = sorted(w for w in weights if w and w not in served)
        if not foreign:
            return
        named = _json_dict(meta.get("models"))
        saved = named.get(foreign[0]) or meta.get("model", "?").split(":")[0]
        raise SessionDBError(f"session database {self.path} holds sessions of model {saved} (weights {foreign[0][:12]}), "
                             f"but this server runs {', '.join(sorted(self.models))} "
                             f"(weights {', '.join(sha[:12] for sha in sorted(served))}): their states do not fit. "
                             "Serve that model too (CHARLSTM_MODELS), point CHARLSTM_SESSION_DB at another file, or move this one away")

    def write(self, changed: list[SessionRecord], removed: list[str], replace_all: bool = False) -> None:
        """Apply changes in one transaction: readers and crashes see the old snapshot or the new one."""
        rows = [(s.id, state_to_bytes(s.state), s.state.shape[1], s.state.shape[2], str(s.seed), s.counter, s.position,
                 s.ttl_s, s.created_at, s.last_used, s.version, s.model) for s in changed]
        if not self.path.exists():  # the first snapshot: build it aside, so the file appears complete
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))  # SQLite gives its WAL and SHM this mode
                os.chmod(tmp, FILE_MODE)  # whatever the umask
                with self._connect(tmp) as conn:
                    self._apply(conn, rows, [], False)
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                os.replace(tmp, self.path)
            finally:
                for suffix in ("", "-wal", "-shm"):  # a build that failed (no space) leaves nothing behind
                    Path(str(tmp) + suffix).unlink(missing_ok=True)
            return
        with self._connect() as conn:
            self._apply(conn, rows, removed, replace_all)

    def sync(self) -> None:
        """Put what the OS holds of the file's write-ahead log on the disk (policy everysec, once a second)."""
        wal = Path(f"{self.path}-wal")
        if not wal.exists():
            return
        fd = os.open(wal, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _apply(self, conn: sqlite3.Connection, rows: list[tuple], removed: list[str], replace_all: bool) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:  # the schema statement by statement, inside the transaction (executescript would commit first)
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            if replace_all:
                conn.execute("DELETE FROM sessions")
            conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in removed])
            conn.executemany(f"INSERT OR REPLACE INTO sessions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            saved = conn.execute("SELECT value FROM meta WHERE key = 'models'").fetchone()
            named = {**_json_dict(saved[0] if saved else None), **{sha: ref for ref, sha in self.models.items()}}
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('models', ?)", (json.dumps(named, sort_keys=True),))
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk does): a second ROLLBACK would raise
            # "no transaction is active" and hide the error that matters
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise


class Snapshots:
    """Keeps an in-memory store's sessions in a SessionDB: loaded at start, every acknowledged change
    written before its answer (`persist`), the rest every `interval_s`, everything at shutdown. A failed load or write is counted
    (`events.on_session_snapshot_failed(operation)`), logged once per outage with the real error, and retried after a backoff that doubles
    up to `max_backoff_s`; until a failed load succeeds no write replaces the file's contents, so its
    sessions are never overwritten by a server that could not read them. The blocking methods run in a
    worker thread."""

    def __init__(self, db: SessionDB, store, interval_s: float, max_backoff_s: float = 60.0,
                 events: EngineStats | None = None, clock=time.time):
        self.db, self.store, self.interval_s, self.max_backoff_s = db, store, interval_s, max_backoff_s
        self.events, self.clock = events if events is not None else Fanout(EngineStats), clock
        self.loaded, self.restored, self.full = False, 0, False  # full: the next write rewrites every session
        self.failures, self.consecutive = 0, 0
        self.last_error: str | None = None
        self.last_success_at: float | None = None
        self._lock = threading.Lock()  # one load or write at a time: the loop's, persist's, and the shutdown's
        self._stopping = False
        self._waiting: list[asyncio.Future] = []  # persist calls the next group commit answers
        self._committer: asyncio.Task | None = None  # the task writing group commits, while there are any to write
        self.group_commits = 0  # transactions persist wrote
        self.not_durable = 0  # acknowledged changes that could not be written before their answer
        self._unsynced = False  # policy everysec: written since the last fsync

    # ------------------------------------------------------------------ blocking
    def load(self) -> int:
        """Take the file and restore its sessions (once); returns how many. SessionDBError propagates:
        the file is not this server's to use (another server holds it, or another model wrote it)."""
        with self._lock:
            return self._load()

    def _load(self) -> int:
        if self.loaded:
            return 0
        try:
            if not self.db.is_open:
                self.db.open()
            records = self.db.load()
        except SnapshotUnavailable as e:
            self._failed("load", e)
            return 0
        self.restored = self.store.restore(records)
        self.loaded = True
        self.full = self.full or self.failures > 0  # read late: the next write puts down everything, old and new, at once
        self._succeeded()
        return self.restored

    def write(self) -> bool:
        """One snapshot of what changed (everything after a failure); a failed load is retried first.
        Returns whether the file now holds every change made before the call. Never raises: every
        failure is counted, logged and retried."""
        with self._lock:
            if self._stopping:
                return False
            try:
                return self._write()
            except Exception as e:  # a late load found the file is not ours, or the disk failed oddly
                self._failed("load" if not self.loaded else "write", e)
                return False

    def _write(self) -> bool:
        if not self.loaded:
            self._load()
            if not self.loaded:
                return False
        changed, removed = self.store.take_changes()
        if self.full:
            changed, removed = self.store.all_records(), []
        try:
            if changed or removed or self.full:
                self.db.write(changed, removed, self.full)
                self._unsynced = True
            self.full = False
        except Exception as e:  # the file is as the last good snapshot left it; the sessions are in memory
            self.full = True
            self._failed("write", e)
            if is_corruption(e):  # found while writing: set it aside; the next write builds a new file of every session
                with contextlib.suppress(SnapshotUnavailable):
                    self.db._set_aside(describe(e))
            return False
        self.store.snapshot_done()  # the file now holds every commit made before this snapshot began
        self._succeeded()
        return True

    def sync(self) -> None:
        """Policy everysec: what was written since the last call reaches the disk. Never raises."""
        with self._lock:
            if not self._unsynced or not self.db.is_open:
                return
            self._unsynced = False
            try:
                self.db.sync()
            except OSError as e:
                self._unsynced = True
                self._failed("write", e)

    # ------------------------------------------------------------------ durable before acknowledged
    async def persist(self) -> bool:
        """Wait until every change made to the store before this call is in the file (under the fsync
        policy), so that an answer sent after it survives a crash. The calls that arrive while a
        transaction is being written share the next one (a group commit). False: the disk could not
        take it now, or it is degraded (the change is in memory, and the periodic snapshot writes it once
        the disk is back)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_groups())
        return await asyncio.shield(future)  # a client that goes away does not cancel the others' commit

    async def _commit_groups(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            try:
                # a degraded file is retried by the periodic snapshot, on its backoff, not by every call
                durable = self.consecutive == 0 and await asyncio.to_thread(self.write)
            except BaseException:  # the loop is closing: nobody is answered as durable
                durable = False
                for future in [*group, *self._waiting]:
                    if not future.done():
                        future.set_result(False)
                raise
            self.group_commits += 1
            if not durable:
                self.not_durable += len(group)
                self.events.on_session_not_durable(len(group))
            for future in group:
                if not future.done():
                    future.set_result(durable)

    def final(self) -> int:
        """At shutdown, after the loop's last write (the lock): every session, replacing the file's, once
        the file was read; only what this process changed when it never could be (the file's own sessions
        stay in it). Returns how many; never raises."""
        with self._lock:
            self._stopping = True
            try:
                return self._final()
            except Exception as e:
                self._failed("write", e)
                return 0

    def _final(self) -> int:
        self._load()
        if not self.db.is_open:
            return 0  # the file could never be taken: nothing may be written to it
        saved = self.store.all_records()
        try:
            if self.loaded:
                self.db.write(saved, [], True)
            else:
                changed, removed = self.store.take_changes()
                self.db.write(saved if self.full else changed, removed, False)
        except Exception as e:
            self.full = True  # the changes it took are in no file: the next write, if any, rewrites everything
            self._failed("write", e)
            log.error("the last session snapshot failed (%s): %s keeps what its last good snapshot wrote",
                      describe(e), self.db.path)
            return 0
        return len(saved)

    # ------------------------------------------------------------------ the loop and the state
    def delay(self) -> float:
        """Seconds to the next snapshot: the interval, doubled for every failure in a row."""
        return min(self.max_backoff_s, self.interval_s * 2 ** self.consecutive) if self.consecutive else self.interval_s

    async def run(self) -> None:
        """The periodic snapshot, and for policy everysec the fsync once a second."""
        if self.db.fsync == "everysec":
            await asyncio.gather(self._snapshot_loop(), self._sync_loop())
        else:
            await self._snapshot_loop()

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.delay())
            await asyncio.to_thread(self.write)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.sync)

    def status(self) -> dict:
        """What /ready and /info show."""
        state = "ok" if self.consecutive == 0 else "degraded"
        return {"file": str(self.db.path), "state": state, "fsync": self.db.fsync, "durable": self.consecutive == 0,
                "not_durable": self.not_durable, "group_commits": self.group_commits,
                "loaded": self.loaded, "restored": self.restored,
                "snapshots": self.store.snapshots, "failures": self.failures, "failures_in_a_row": self.consecutive,
                "last_error": self.last_error, "last_success_at": self.last_success_at,
                "retry_in_s": self.delay() if self.consecutive else None}

    def _failed(self, operation: str, e: BaseException) -> None:
        self.failures += 1
        self.consecutive += 1
        self.last_error = describe(e.__cause__ or e) if isinstance(e, SnapshotUnavailable) else describe(e)
        self.events.on_session_snapshot_failed(operation)
        if self.consecutive == 1:
            log.warning("session %s of %s failed (%s); the sessions stay in memory and the file as it was, "
                        "retrying with backoff", "loading" if operation == "load" else "snapshot", self.db.path, self.last_error)

    def _succeeded(self) -> None:
        if self.consecutive:
            log.warning("session snapshots of %s work again after %d failures", self.db.path, self.consecutive)
        self.consecutive, self.last_success_at = 0, self.clock()
