"""The composition root: builds the services from the settings (the model pool and an engine for each
loaded model, the session store, its snapshots and health, the quotas), attaches the metrics, runs them
for the HTTP app's lifetime and shuts them down in order. `uvicorn service.server:app` serves it.

Building the app is cheap (no settings read, no model loaded): that happens when the app starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from . import memory
from .api import logs
from .api.app import create_app, keys_of
from .api.bridge import make_deliver
from .api.quotas import Quotas
from .api.services import Services
from .backends.base import kernel_threads, set_kernel_threads
from .backends.selector import for_serving
from .engine import constraints
from .engine.engine import Engine, EngineConfig, EngineStats
from .engine.observers import Fanout
from .engine.pool import Catalog, ModelPool, PoolObserver
from .metrics import Metrics, ServerObserver, instrument
from .sessions import blob as session_blob
from .sessions.calls import SessionCalls, memory_only
from .sessions.health import StoreHealth
from .sessions.memory_store import MemorySessionStore
from .sessions.redis_store import RedisSessionStore, StoreMismatch, redacted
from .sessions.snapshots import SessionDB, SessionDBError, Snapshots
from .settings import Settings, unknown_variables
from .model.store import LoadedModel

log = logging.getLogger("charlstm.server")

EngineHook = Callable  # hook(engine, loaded model, session store): called for every engine the pool starts


class EngineHooks:
    """Calls the engine hooks for every engine the pool starts, with the session store once it is built
    (the pool starts engines only after it is)."""

    def __init__(self, hooks: list[EngineHook]):
        self.hooks, self.session_store = hooks, None

    def on_model_loaded(self, served) -> None:
        for hook in self.hooks:
            hook(served.engine, served.loaded, self.session_store)

    def on_model_unloaded(self, served, reason: str) -> None:
        pass


@dataclass
class Wiring:
    """What else the services report to, and what a test reaches in with."""
    pool_observers: list[PoolObserver] = field(default_factory=list)  # models loaded and unloaded
    server_observers: list[EngineStats] = field(default_factory=list)  # session events and refusals
    started_hooks: list[Callable] = field(default_factory=list)  # hook(pool, session store) once the default model is loaded
    engine_hooks: list[EngineHook] = field(default_factory=list)


@asynccontextmanager
async def running(settings: Settings, wiring: Wiring, preloaded: LoadedModel | None = None,
                  session_store_factory=None, engines=None) -> AsyncIterator[Services]:
    """The services, started; on leaving, the engines drain and stop, and the sessions are saved.
    preloaded: a model the caller has already loaded (and so validated), else it is read from the store.
    session_store_factory(max_sessions, on_removed=...): the session store (default: the `session_store`
    setting's, in memory with SQLite snapshots when `session_db` is set). engines(settings, deliver): how the
    pool builds an engine (default: `engine_factory`, in this process)."""
    logs.configure(settings.log_level)
    memory.fix_mmap_threshold()
    memory.collect_young_less_often()
    if unknown := unknown_variables(os.environ):
        log.warning("ignored: %s set no setting (README, \"Settings\", lists them)", ", ".join(unknown))
    if settings.torch_threads:
        set_kernel_threads(settings.torch_threads)
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    keys_of(settings)  # a keys file that cannot be read stops the start, with what is wrong
    events = Fanout(EngineStats, wiring.server_observers)  # session events: not any one model's
    catalog = Catalog(settings.model_store, settings.models, settings.model, preloaded)
    hooks = EngineHooks(wiring.engine_hooks)
    build_engine = (engines or engine_factory)(settings, make_deliver(asyncio.get_running_loop()))
    pool = ModelPool(catalog, build_engine, settings.max_loaded_models,
                     settings.model_keep_alive_s, observers=[hooks, *wiring.pool_observers])
    await asyncio.to_thread(catalog.refresh)
    served_models = {m.ref: m.fingerprint for m in catalog.models.values()}
    default = catalog.resolve(None)
    session_key, key_source = session_blob.load_or_create_key(settings.session_key, settings.session_db or None)
    factory = session_store_factory or store_factory(settings, session_key, served_models)
    session_store = hooks.session_store = factory(settings.max_sessions, on_removed=events.on_session_removed)
    if isinstance(session_store, RedisSessionStore):
        try:
            await asyncio.to_thread(session_store.claim)
        except StoreMismatch as e:
            session_store.close()
            log.error("%s", e)
            raise
    persistence = None  # the in-memory store's SQLite snapshots
    if settings.session_db and isinstance(session_store, MemorySessionStore):
        session_db = SessionDB(settings.session_db, served_models, settings.session_fsync)
        persistence = Snapshots(session_db, session_store, settings.snapshot_interval_s, events=events)
        try:
            await asyncio.to_thread(persistence.load)  # takes the file; a disk that fails now leaves it degraded, retried
        except SessionDBError as e:
            session_db.close()
            log.error("%s", e)
            raise
    sessions = SessionCalls(session_store, settings.session_lease_s, settings.session_ttl_s, events=events,
                            observe=events.on_session_store_call,
                            blob_max_age_s=settings.session_blob_max_age_s, threads=settings.session_store_threads,
                            persist=persistence.persist if persistence else
                            memory_only if isinstance(session_store, MemorySessionStore) else None)
    # the longest one store operation may take: Redis's timeouts (redis_store.py); the embedded store answers at once
    health = StoreHealth(session_store, 4 * settings.session_store_timeout_s)
    await health.check(sessions.executor)  # the first /ready already knows (bounded by the store's timeouts)
    services = Services(pool=pool, sessions=sessions, session_store=session_store, persistence=persistence,
                        store_health=health, session_quotas=Quotas(settings.session_create_rate, settings.session_create_burst),
                        events=events, session_key=session_key)
    await pool.start()  # loads the default model: a broken one fails the start
    for hook in wiring.started_hooks:
        hook(pool, session_store)
    restore_signal = drain_on_sigterm(pool, settings.drain_delay_s + settings.shutdown_grace_s)
    sweeper = asyncio.create_task(health.sweep(sessions.executor))
    snapshots = asyncio.create_task(persistence.run()) if persistence else None
    first = pool.loaded[default.ref]
    log.info("serving %s (weights %s, %s parameters, backend %s) on %s, %d threads a kernel, %d step workers; %d models servable "
             "(at most %d loaded, keep-alive %gs); max batch %d, queue %d, max new tokens %d, max prompt %d chars, drain %gs + "
             "grace %gs; sessions: %s store%s, %d restored, at most %d, signed with %s; listening on %s:%d",
             default.ref, default.fingerprint[:12], f"{first.loaded.num_parameters:,}", first.details["backend"]["name"],
             first.details["device_name"], kernel_threads(), first.details["step_workers"], len(catalog.models),
             settings.max_loaded_models, settings.model_keep_alive_s, settings.max_batch_size, settings.max_queue,
             settings.max_new_tokens, settings.max_prompt_chars, settings.drain_delay_s, settings.shutdown_grace_s,
             session_store.kind,
             f" saved to {settings.session_db}" if persistence else f" at {redacted(settings.session_store)}" if settings.session_store != "memory" else "",
             persistence.restored if persistence else 0, settings.max_sessions, key_source, settings.host, settings.port)
    try:
        yield services
    finally:
        sweeper.cancel()
        if snapshots is not None:
            snapshots.cancel()
        restore_signal()
        pool.begin_shutdown(settings.shutdown_grace_s)
        await asyncio.to_thread(pool.wait_idle, settings.shutdown_grace_s + 5.0)
        await pool.close()
        await asyncio.to_thread(constraints.COMPILER.close)  # the pattern compiler's child process, if one started
        if persistence is not None:
            saved = await asyncio.to_thread(persistence.final)
            persistence.db.close()
            log.info("saved %d sessions to %s", saved, settings.session_db)
        sessions.close()
        session_store.close()


def engine_factory(settings: Settings, deliver: Callable[[list], None]):
    """How the pool builds a model's engine: its backend (measured on this machine for backend auto) and its
    batch. deliver: the engine's hand-over of each look's events (to the event loop: api/bridge.py)."""
    def build(loaded: LoadedModel, share):
        serving = for_serving(loaded, settings.backend, settings.quantize, settings.device, settings.max_batch_size,
                              settings.step_workers, settings.decode_steps, fingerprint=loaded.card["weights_sha256"],
                              cache=Path(settings.backend_cache) if settings.backend_cache else None, apart=True)
        runner = serving.backend
        loaded.drop_module()  # the backend's own copy of the weights is all it steps with
        memory.give_back()  # what the build's probes and measurements freed
        engine = Engine(runner, loaded.vocab,
                        EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                     prefill_chunk=settings.prefill_chunk, prefill_rows=settings.prefill_rows,
                                     decode_steps=serving.decode_steps, quiet_steps=settings.quiet_steps,
                                     max_rows_per_request=settings.max_rows_per_request,
                                     deliver_interval_s=settings.stream_interval_ms / 2000,  # half the SSE writer's interval
                                     prompt_cost=settings.prompt_cost),
                        deliver=deliver, share=share)
        log.info("backend %s for %s@%s: every step call sees %d to %d rows, the batch sizes that round a row alike on this CPU",
                 runner.name, loaded.name, loaded.version, runner.min_rows, runner.max_rows)
        details = {"backend": {**runner.describe(), **({"choice": serving.choice.as_dict()} if serving.choice else {})},
                   "device": runner.device_type, "device_name": serving.device_name, "decode_steps": serving.decode_steps,
                   "step_workers": runner.workers, "rows_per_call": [runner.min_rows, runner.max_rows]}
        return engine, details
    return build


def store_factory(settings: Settings, key: bytes, models: dict[str, str]):
    """The store `session_store` names: in this process, or Redis shared by every replica. `models`: each
    servable model's name@version and weights sha256."""
    if settings.session_store == "memory":
        return MemorySessionStore
    return lambda max_sessions, on_removed: RedisSessionStore(settings.session_store, max_sessions, on_removed, key=key,
                                                              models=models, timeout_s=settings.session_store_timeout_s)


def drain_on_sigterm(pool: ModelPool, grace_s: float):
    """On SIGTERM/SIGINT: readiness turns 503, new work is refused, and running streams get `grace_s` to finish
    (the drain delay plus the shutdown grace: `charlstm serve` keeps listening for drain_delay_s, then closes
    the port and waits for open responses); then the server's own handler runs."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig, frame):
        pool.begin_shutdown(grace_s)
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


def attach_metrics(app: FastAPI, wiring: Wiring, settings: Callable[[], Settings]) -> Metrics:
    """Prometheus's view of the services: the pool's models, the engines' and sessions' events, /metrics."""
    metrics = instrument(app)
    wiring.pool_observers.append(metrics)
    wiring.server_observers.append(ServerObserver(metrics))
    wiring.started_hooks.append(lambda pool, session_store: metrics.attach(pool, session_store, settings()))
    return metrics


def build_app(settings: Settings | None = None, loaded: LoadedModel | None = None, session_store_factory=None,
              engine_hooks=(), engines=None) -> FastAPI:
    """The app with its services and metrics; `loaded`, `session_store_factory`, `engines`: as `running`'s.
    engine_hooks: hook(engine, loaded model, session store) for every engine started (how a test reaches in)."""
    wiring = Wiring(engine_hooks=list(engine_hooks))
    app = create_app(lambda settings: running(settings, wiring, loaded, session_store_factory, engines), settings)
    app.state.metrics = attach_metrics(app, wiring, lambda: app.state.settings)
    return app


app = build_app()
