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
from ..engine.sessions import InMemorySessionStore, SessionManager
from ..settings import Settings
from . import errors
from .bridge import make_deliver
from .limits import BodyLimit
from .routes import generate, probes, sessions

log = logging.getLogger("charlstm.api")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = app.state.settings = app.state.settings or Settings()
    # The engine drains streams itself (finish_reason "shutdown" after the grace), so sse-starlette must
    # not cut them off the moment the server begins to exit.
    AppStatus.disable_automatic_graceful_drain()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    loaded = await asyncio.to_thread(store.load, settings.model, settings.model_store)
    engine_box: list[Engine] = []
    manager = SessionManager(InMemorySessionStore(), settings.max_sessions, settings.session_ttl_s,
                             on_evict=lambda reason: engine_box[0].notify("on_session_removed", reason))
    engine = Engine(Runner(loaded.model), loaded.vocab, manager,
                    EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                 prefill_chunk=settings.prefill_chunk),
                    deliver=make_deliver(asyncio.get_running_loop()))
    engine_box.append(engine)
    for hook in app.state.engine_hooks:
        hook(engine, loaded)
    app.state.loaded = loaded
    engine.start()
    app.state.engine = engine
    restore_signal = _drain_on_sigterm(engine, settings.shutdown_grace_s)
    sweeper = asyncio.create_task(_sweep_sessions(manager))
    log.info("serving %s@%s (%s parameters)", loaded.name, loaded.version, f"{loaded.model.num_parameters():,}")
    try:
        yield
    finally:
        sweeper.cancel()
        restore_signal()
        engine.begin_shutdown(settings.shutdown_grace_s)
        await asyncio.to_thread(engine.wait_idle, settings.shutdown_grace_s + 5.0)
        engine.stop()


async def _sweep_sessions(manager: SessionManager, every_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(manager.purge_expired)


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


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="charlstm", version=__version__, lifespan=lifespan,
                  description="Character-level LSTM text generation with continuous batching, streaming and sessions.")
    app.state.settings = settings
    app.state.engine_hooks = []
    errors.install(app)
    app.add_middleware(BodyLimit, limit=lambda: (app.state.settings or Settings()).max_body_bytes)
    app.include_router(generate.router)
    app.include_router(sessions.router)
    app.include_router(probes.router)
    return app
