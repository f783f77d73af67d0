"""The FastAPI application: routes, error shape, and the lifespan that loads the model and runs the engine.

Nothing heavy happens at import: settings are read and the model is loaded in the lifespan, and one
process owns the engine. Later stages (metrics) attach through `app.state.engine_hooks`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from .. import __version__, store
from ..engine.engine import Engine, EngineConfig
from ..engine.runner import Runner
from ..engine.session_db import SessionDB
from ..engine.sessions import InMemorySessionStore, SessionManager
from ..settings import Settings
from . import errors, openapi
from .auth import APIKeyAuth
from .bridge import make_deliver
from .limits import BodyLimit
from .routes import generate, playground, probes, sessions

log = logging.getLogger("charlstm.api")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = app.state.settings = app.state.settings or Settings()
    # The engine drains streams itself (finish_reason "shutdown" after the grace), so sse-starlette must
    # not cut them off the moment the server begins to exit.
    AppStatus.disable_automatic_graceful_drain()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    loaded = app.state.preloaded or await asyncio.to_thread(store.load, settings.model, settings.model_store)
    app.state.preloaded = None
    manager = SessionManager(InMemorySessionStore(), settings.max_sessions, settings.session_ttl_s,
                             on_evict=lambda reason: engine.notify("on_session_removed", reason))  # bound below
    engine = Engine(Runner(loaded.model, settings.step_workers), loaded.vocab, manager,
                    EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                 prefill_chunk=settings.prefill_chunk),
                    deliver=make_deliver(asyncio.get_running_loop()))
    session_db = None
    if settings.session_db:
        model_key = f"{loaded.name}@{loaded.version}:{loaded.card['weights_sha256'][:16]}"
        session_db = SessionDB(settings.session_db, model_key)
        restored = manager.restore(await asyncio.to_thread(session_db.load))
        log.info("restored %d sessions from %s", restored, settings.session_db)
    for hook in app.state.engine_hooks:
        hook(engine, loaded)
    app.state.loaded = loaded
    engine.start()
    app.state.engine = engine
    restore_signal = _drain_on_sigterm(engine, settings.shutdown_grace_s)
    sweeper = asyncio.create_task(_sweep_sessions(manager))
    snapshots = asyncio.create_task(_snapshot_sessions(manager, session_db, settings.snapshot_interval_s)) if session_db else None
    log.info("serving %s@%s (%s parameters)", loaded.name, loaded.version, f"{loaded.model.num_parameters():,}")
    try:
        yield
    finally:
        sweeper.cancel()
        if snapshots is not None:
            snapshots.cancel()
        restore_signal()
        engine.begin_shutdown(settings.shutdown_grace_s)
        await asyncio.to_thread(engine.wait_idle, settings.shutdown_grace_s + 5.0)
        engine.stop()
        if session_db is not None:
            saved = manager.all_sessions()
            await asyncio.to_thread(session_db.write, saved, [], True)
            log.info("saved %d sessions to %s", len(saved), settings.session_db)


async def _sweep_sessions(manager: SessionManager, every_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(manager.purge_expired)


async def _snapshot_sessions(manager: SessionManager, db: SessionDB, every_s: float) -> None:
    """Write changed sessions every few seconds, so a crash loses at most that much."""
    full = False  # after a failed write, the next one rewrites everything
    while True:
        await asyncio.sleep(every_s)
        changed, removed = manager.take_changes()
        if full:
            changed, removed = manager.all_sessions(), []
        if changed or removed or full:
            try:
                await asyncio.to_thread(db.write, changed, removed, full)
                full = False
            except Exception:
                log.exception("writing the session snapshot failed; the next snapshot rewrites all sessions")
                full = True


def _drain_on_sigterm(engine: Engine, grace_s: float):
    """On SIGTERM/SIGINT: readiness turns 503 and running streams get `grace_s` to finish, then the
    server's own handler runs (it stops accepting and waits for open responses)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig, frame):
        engine.begin_shutdown(grace_s)
        prev = previous.get(sig)
        if callable(prev):
            prev(sig, frame)

    for sig in previous:
        signal.signal(sig, handler)

    def restore():
        for sig, prev in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prev)

    return restore


def create_app(settings: Settings | None = None, loaded: store.LoadedModel | None = None) -> FastAPI:
    """`loaded`: a model the caller has already loaded (and so validated), else the lifespan loads it."""
    app = FastAPI(title="charlstm", version=__version__, lifespan=lifespan,
                  description="Character-level LSTM text generation with continuous batching, streaming and sessions.")
    app.state.settings = settings
    app.state.preloaded = loaded
    app.state.engine_hooks = []
    errors.install(app)
    openapi.install(app)
    current = lambda: app.state.settings or Settings()  # noqa: E731 - read when a request comes, not at import
    app.add_middleware(BodyLimit, limit=lambda: current().max_body_bytes)
    app.add_middleware(APIKeyAuth, key=lambda: current().api_key, protect_metrics=lambda: current().protect_metrics)
    app.include_router(generate.router)
    app.include_router(sessions.router)
    app.include_router(probes.router)
    app.include_router(playground.router)
    return app
