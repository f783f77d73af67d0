"""Generation calls on sessions: lease a copy, run the engine from it, commit what it returns.

This is where sessions meet the engine, on the asyncio side. Store calls run in worker threads,
never on the engine thread (a store may block on a network) and never on the event loop. A lease is
renewed while its call runs, so a long generation keeps its session; a call that did not complete
(cancelled, shut down, failed) releases the lease and leaves the session as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from collections import OrderedDict
from dataclasses import replace

from . import blob as session_blob
from .blob import InvalidSessionBlob, SessionValue
from .records import Lease, SessionRecord, new_session_id
from .store import SessionStore
from ..engine.engine import EngineStats
from ..engine.observers import Fanout
from ..engine.types import Done, EngineError, GenerationRequest
from .errors import LeaseLost, SessionBusy, SessionStoreUnavailable

log = logging.getLogger("charlstm.sessions")

MODEL_CACHE = 65_536  # sessions whose model SessionCalls.model_of remembers
StoreObserver = Callable[[str, float, bool], None]  # (operation, seconds, failed)


class SessionCalls:
    def __init__(self, store: SessionStore, lease_s: float, default_ttl_s: float,
                 events: EngineStats | None = None, observe: StoreObserver | None = None,
                 blob_max_age_s: float | None = None, threads: int = 16,
                 persist: Callable[[], Awaitable[bool]] | None = None):
        """`events` reports session events to the server's observers (an EngineStats: `events.on_session_created()`);
        `observe(operation, seconds, failed)` times every store call; `blob_max_age_s`: the oldest
        export an import takes. Store calls run in `threads` threads of their own, so a store that
        hangs holds those and never the threads the rest of the server hands work to. `persist()`
        makes every change made so far durable before a change is acknowledged (the embedded
        store's file: snapshots.Snapshots.persist) and says whether it could; None: a change is as
        durable as the store's own commit (a shared store's, under its persistence policy)."""
        self.store, self.lease_s, self.default_ttl_s = store, lease_s, default_ttl_s
        self.persist = persist or _durable_in_store
        self.blob_max_age_s = blob_max_age_s
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="charlstm-sessions")
        self.events = events if events is not None else Fanout(EngineStats)  # none: nobody hears them
        self.observe = observe or (lambda op, seconds, failed: None)
        self._models: OrderedDict[str, str] = OrderedDict()  # session id -> weights sha256 (model_of)

    async def run(self, op: str, fn, *args):
        """One store operation in a worker thread, timed; a failure of the store itself becomes
        SessionStoreUnavailable (the session errors, NotFound, Busy and the like pass through)."""
        t0, failed = time.perf_counter(), False
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))
        except EngineError as e:
            if e.type in ("session_busy", "too_many_sessions"):
                self.events.on_rejected(e.type)
            raise
        except Exception as e:
            failed = True
            log.warning("session store %s failed: %s: %s", op, type(e).__name__, e)
            raise SessionStoreUnavailable(f"the session store is unavailable ({type(e).__name__}); retry shortly") from e
        finally:
            self.observe(op, time.perf_counter() - t0, failed)

    def close(self) -> None:
        """Stop taking store calls; a call still waiting on a hung store is left to its timeout."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def metadata(self, session_id: str) -> tuple[SessionRecord, bool]:
        """The committed record, and whether a call is running on it."""
        record = await self.run("get", self.store.get, session_id)
        return record, await self.run("is_leased", self.store.is_leased, session_id)

    async def model_of(self, session_id: str) -> str:
        """The weights (sha256) a session belongs to. A session never changes model and ids are never
        reused, so an answer is kept (for the most recent MODEL_CACHE sessions) and a call costs no extra
        store read after the first."""
        sha = self._models.get(session_id)
        if sha is None:
            sha = (await self.run("get", self.store.get, session_id)).model
            self._remember(session_id, sha)
        else:
            self._models.move_to_end(session_id)
        return sha

    def _remember(self, session_id: str, sha: str) -> None:
        self._models[session_id] = sha
        if len(self._models) > MODEL_CACHE:
            self._models.popitem(last=False)

    async def delete(self, session_id: str) -> bool:
        """Remove the session; returns whether the removal is durable (a crash cannot bring it back)."""
        await self.run("delete", self.store.delete, session_id)
        return await self.persist()

    async def create(self, primed: Done, ttl_s: float | None, fingerprint: str) -> tuple[SessionRecord, bool]:
        """A new session from a completed priming stream (its Done carries the state) of the model whose
        weights' sha256 is `fingerprint`: the session belongs to that model for good. Returns it and
        whether it is durable."""
        now = time.time()
        record = SessionRecord(id=new_session_id(), state=primed.state, seed=primed.seed, counter=primed.counter,
                               position=primed.prompt_tokens + primed.completion_tokens, model=fingerprint,
                               ttl_s=float(ttl_s or self.default_ttl_s), created_at=now, last_used=now)
        return await self._insert(record)

    async def _insert(self, record: SessionRecord) -> tuple[SessionRecord, bool]:
        created = await self.run("create", self.store.create, record)
        self._remember(created.id, created.model)
        self.events.on_session_created()
        return created, await self.persist()

    # ------------------------------------------------------------------ portable sessions
    async def export(self, session_id: str, key: bytes) -> tuple[SessionRecord, bytes]:
        """The committed record and its signed blob. A call running on the session is not in it:
        the store only ever hands out committed versions, so the snapshot is never half-written."""
        record = await self.run("get", self.store.get, session_id)
        value = SessionValue(state=record.state, seed=record.seed, counter=record.counter, position=record.position,
                             created_at=time.time(), fingerprint=record.model)
        return record, session_blob.encode(value, key)

    async def import_blob(self, text: str, key: bytes, *, model: str, fingerprint: str, layers: int, hidden: int,
                          ttl_s: float | None, position: int | None = None) -> tuple[SessionRecord, bool]:
        """A new session (a new id: ids never come from a blob) holding what an export carried.
        `model` names the serving model in a mismatch; `position`, when the client sent one, must agree
        with the blob's (the signed value is the truth, so a changed copy beside it is refused)."""
        expected = session_blob.text_chars(layers, hidden)
        if len(text.rstrip("=")) != expected:  # another size: an intact export of another model's weights, or a broken blob
            try:
                session_blob.decode(session_blob.from_text(text), key, fingerprint=fingerprint, model=model)  # raises ModelMismatch
            except session_blob.ModelMismatch:
                raise
            except InvalidSessionBlob:
                pass
            raise InvalidSessionBlob(f"data is {len(text)} characters; a session of {model} is {expected}")
        value = session_blob.decode(session_blob.from_text(text), key, fingerprint=fingerprint, layers=layers,
                                    hidden=hidden, model=model)
        session_blob.check_age(value, self.blob_max_age_s, time.time())
        if position is not None and position != value.position:
            raise InvalidSessionBlob(f"position {position} does not match the blob's position {value.position}", "position")
        return await self._create_copy(value.state, value.seed, value.counter, value.position, ttl_s or self.default_ttl_s,
                                       fingerprint)

    async def fork(self, session_id: str, ttl_s: float | None) -> tuple[SessionRecord, bool]:
        """A new session with the same state, seed, counter and position as `session_id` (and its TTL
        unless `ttl_s` is given). A session with a call running is refused: its state is about to move."""
        if await self.run("is_leased", self.store.is_leased, session_id):
            raise SessionBusy(f"session {session_id} has a call running; fork it before or after the call")
        record = await self.run("get", self.store.get, session_id)
        return await self._create_copy(record.state, record.seed, record.counter, record.position, ttl_s or record.ttl_s,
                                       record.model)

    async def _create_copy(self, state, seed: int, counter: int, position: int, ttl_s: float,
                           fingerprint: str) -> tuple[SessionRecord, bool]:
        now = time.time()
        return await self._insert(SessionRecord(id=new_session_id(), state=state, seed=seed, counter=counter,
                                                position=position, model=fingerprint, ttl_s=float(ttl_s),
                                                created_at=now, last_used=now))

    async def begin(self, session_id: str, request: GenerationRequest) -> tuple[SessionCall, GenerationRequest]:
        """Lease the session and turn `request` into one that continues it. A seed in the request
        re-seeds the session (its random stream restarts at that seed)."""
        lease = await self.run("lease", self.store.lease, session_id, self.lease_s)
        record = lease.record
        seed, counter = (record.seed, record.counter) if request.seed is None else (request.seed, 0)
        request = replace(request, state=record.state, seed=seed, counter=counter, return_state=True)
        return SessionCall(self, lease), request


class SessionCall:
    """One leased call. `finish` is given the stream's Done, whatever happened to the client."""

    def __init__(self, calls: SessionCalls, lease: Lease):
        self.calls, self.lease = calls, lease
        self._renewer = asyncio.create_task(self._keep_lease())

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.calls.lease_s / 3)
            try:
                self.lease = await self.calls.run("renew", self.calls.store.renew, self.lease, self.calls.lease_s)
            except LeaseLost:
                log.warning("lost the lease on session %s… while a call ran", self.lease.session_id[:4])  # never a whole id
                return
            except EngineError:
                continue  # the store is away for now; the lease may still outlive the outage

    async def finish(self, done: Done) -> Done:
        """Commit a completed call; release the lease of any other."""
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        store = self.calls.store
        if done.completed and done.state is not None:
            record = self.lease.record.advanced(done.state, done.seed, done.counter, done.prompt_tokens + done.completion_tokens)
            try:
                committed = await self.calls.run("commit", store.commit, self.lease, record)
            except SessionStoreUnavailable:
                with contextlib.suppress(EngineError):  # give the session back if the store still answers that much
                    await self.calls.run("release", store.release, self.lease)
                raise
            durable = await self.calls.persist()  # before the answer: an acknowledged call survives a crash
            return replace(done, state=None, session={**committed.metadata(), "durable": durable})
        await self.abandon()
        return replace(done, state=None, session=self.lease.record.metadata())

    async def abandon(self) -> None:
        """The call never ran or did not complete: the session stays as it was."""
        self._renewer.cancel()
        await self.calls.run("release", self.calls.store.release, self.lease)


async def _durable_in_store() -> bool:
    """A store whose commit is its own durability (Redis, under its appendfsync policy)."""
    return True


async def memory_only() -> bool:
    """The embedded store with no session file: nothing outlives the process."""
    return False
