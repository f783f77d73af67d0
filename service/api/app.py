"""The FastAPI application: routes, error shape, and the lifespan that loads the model and runs the engine.

Nothing heavy happens at import: settings are read and the default model is loaded in the lifespan; the
model pool (service/engine/pool.py) owns an engine per loaded model. Later stages (metrics) attach through
`app.state.pool_observers` and `app.state.server_observers`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__, memory, store
from ..backends.base import kernel_threads, set_kernel_threads
from ..backends.selector import for_serving
from ..engine.engine import Engine, EngineConfig
from ..engine.engine import EngineStats
from ..engine.observers import Fanout
from ..engine.pool import Catalog, ModelPool
from ..sessions.memory_store import MemorySessionStore
from ..sessions.redis_store import RedisSessionStore, StoreMismatch, redacted
from ..sessions import blob as session_blob
from ..sessions.calls import SessionCalls, memory_only
from ..sessions.health import StoreHealth
from ..sessions.snapshots import SessionDB, SessionDBError, Snapshots
from ..settings import Settings, unknown_variables
from . import docs, errors, logs, openapi
from .quotas import Quotas
from .auth import APIKeyAuth, TrustedHosts
from .identity import Keys, keys_for
from .bridge import make_deliver
from .limits import BodyLimit
from ..engine import constraints
from .routes import generate, models, playground, probes, score, sessions, tokenizer, v1

log = logging.getLogger("charlstm.api")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = app.state.settings = app.state.settings or Settings()
    logs.configure(settings.log_level)
    memory.fix_mmap_threshold()
    if unknown := unknown_variables(os.environ):
        log.warning("ignored: %s set no setting (README, \"Settings\", lists them)", ", ".join(unknown))
    if settings.torch_threads:
        set_kernel_threads(settings.torch_threads)
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    keys_of(settings)  # a keys file that cannot be read stops the start, with what is wrong
    events = app.state.events = Fanout(EngineStats, app.state.server_observers)  # session events: not any one model's
    catalog = Catalog(settings.model_store, settings.models, settings.model, app.state.preloaded)
    app.state.preloaded = None
    hooks = EngineHooks(app)
    pool = app.state.pool = ModelPool(catalog, _engine_factory(settings, asyncio.get_running_loop()),
                                      settings.max_loaded_models, settings.model_keep_alive_s,
                                      observers=[hooks, *app.state.pool_observers])
    await asyncio.to_thread(catalog.refresh)
    served_models = {m.ref: m.fingerprint for m in catalog.models.values()}
    default = catalog.resolve(None)
    app.state.session_key, key_source = session_blob.load_or_create_key(settings.session_key, settings.session_db or None)
    factory = app.state.session_store_factory or _store_factory(settings, app.state.session_key, served_models)
    session_store = factory(settings.max_sessions, on_removed=events.on_session_removed)
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
    app.state.persistence = persistence
    app.state.sessions = SessionCalls(session_store, settings.session_lease_s, settings.session_ttl_s, events=events,
                                      observe=events.on_session_store_call,
                                      blob_max_age_s=settings.session_blob_max_age_s, threads=settings.session_store_threads,
                                      persist=persistence.persist if persistence else
                                      memory_only if isinstance(session_store, MemorySessionStore) else None)
    app.state.session_quotas = Quotas(settings.session_create_rate, settings.session_create_burst)
    # the longest one store operation may take: Redis's timeouts (redis_store.py); the embedded store answers at once
    app.state.store_health = health = StoreHealth(session_store, 4 * settings.session_store_timeout_s)
    await health.check(app.state.sessions.executor)  # the first /ready already knows (bounded by the store's timeouts)
    app.state.session_store = session_store
    await pool.start()  # loads the default model: a broken one fails the start
    for hook in app.state.started_hooks:
        hook(pool, session_store)
    restore_signal = _drain_on_sigterm(pool, settings.drain_delay_s + settings.shutdown_grace_s)
    sweeper = asyncio.create_task(health.sweep(app.state.sessions.executor))
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
        yield
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
        app.state.sessions.close()
        session_store.close()


class EngineHooks:
    """Calls `app.state.engine_hooks` (engine, loaded model, session store) for every engine the pool starts:
    how a test reaches into an engine."""

    def __init__(self, app: FastAPI):
        self.app = app

    def on_model_loaded(self, served) -> None:
        for hook in self.app.state.engine_hooks:
            hook(served.engine, served.loaded, self.app.state.session_store)

    def on_model_unloaded(self, served, reason: str) -> None:
        pass


def _engine_factory(settings: Settings, loop: asyncio.AbstractEventLoop):
    """How the pool builds a model's engine: its backend (measured on this machine for backend auto) and its batch."""
    def build(loaded: store.LoadedModel, share):
        serving = for_serving(loaded, settings.backend, settings.quantize, settings.device, settings.max_batch_size,
                              settings.step_workers, settings.decode_steps, fingerprint=loaded.card["weights_sha256"],
                              cache=Path(settings.backend_cache) if settings.backend_cache else None, apart=True)
        runner = serving.backend
        loaded.drop_module()  # the backend's own copy of the weights is all it steps with
        memory.give_back()  # what the build's probes and measurements freed
        engine = Engine(runner, loaded.vocab,
                        EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                     prefill_chunk=settings.prefill_chunk, prefill_rows=settings.prefill_rows,
                                     decode_steps=serving.decode_steps, max_rows_per_request=settings.max_rows_per_request,
                                     deliver_interval_s=settings.stream_interval_ms / 2000,  # half the SSE writer's interval
                                     prompt_cost=settings.prompt_cost),
                        deliver=make_deliver(loop), device_step=serving.device_step, share=share)
        log.info("backend %s for %s@%s: every step call sees %d to %d rows, the batch sizes that round a row alike on this CPU",
                 runner.name, loaded.name, loaded.version, runner.min_rows, runner.max_rows)
        details = {"backend": {**runner.describe(), **({"choice": serving.choice.as_dict()} if serving.choice else {})},
                   "device": runner.device_type, "device_name": serving.device_name, "decode_steps": serving.decode_steps,
                   "step_workers": runner.workers, "rows_per_call": [runner.min_rows, runner.max_rows]}
        return engine, details
    return build


def _store_factory(settings: Settings, key: bytes, models: dict[str, str]):
    """The store `session_store` names: in this process, or Redis shared by every replica. `models`: each
    servable model's name@version and weights sha256."""
    if settings.session_store == "memory":
        return MemorySessionStore
    return lambda max_sessions, on_removed: RedisSessionStore(settings.session_store, max_sessions, on_removed, key=key,
                                                              models=models, timeout_s=settings.session_store_timeout_s)


def _drain_on_sigterm(pool: ModelPool, grace_s: float):
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


def keys_of(settings: Settings) -> Keys:
    """The API keys the server accepts (identity.py; read once and kept)."""
    return keys_for(settings.api_key, str(settings.api_keys_file) if settings.api_keys_file else None)


def create_app(settings: Settings | None = None, loaded: store.LoadedModel | None = None,
               session_store_factory=None) -> FastAPI:
    """`loaded`: a model the caller has already loaded (and so validated), else the lifespan loads it.
    `session_store_factory(max_sessions, on_removed=...)`: the session store (default: in memory, with
    SQLite snapshots when `session_db` is set)."""
    # FastAPI's own OpenTelemetry is off: the server's numbers go to Prometheus (service/metrics.py), and with it
    # on, every request asks OpenTelemetry for a provider, which reads the process's environment each time
    app = FastAPI(title="charlstm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Character-level LSTM text generation with continuous batching, streaming and sessions.",
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.settings = settings
    app.state.preloaded = loaded
    app.state.session_store_factory = session_store_factory
    app.state.engine_hooks = []  # hook(engine, loaded, session_store) for every engine started
    app.state.pool_observers = []  # PoolObserver: models loaded and unloaded (the metrics module's)
    app.state.server_observers = []  # session events, reported through app.state.events
    app.state.started_hooks = []  # hook(pool, session_store) once the default model is loaded
    errors.install(app)
    openapi.install(app)
    current = lambda: app.state.settings or Settings()  # noqa: E731 - read when a request comes, not at import
    app.add_middleware(BodyLimit, limit=lambda: current().max_body_bytes)
    app.add_middleware(APIKeyAuth, keys=lambda: keys_of(current()), protect_metrics=lambda: current().metrics_protected)
    app.add_middleware(TrustedHosts, hosts=lambda: current().trusted_hosts)  # outermost: a foreign Host gets nothing else
    app.include_router(generate.router)
    app.include_router(sessions.router)
    app.include_router(probes.router)
    app.include_router(score.router)
    app.include_router(v1.router)
    app.include_router(tokenizer.router)
    app.include_router(models.router)
    app.include_router(docs.router)  # /docs and /redoc with assets served from the package, not a CDN
    app.mount(docs.ASSETS_URL, docs.assets(), name="docs-assets")
    app.include_router(playground.router)  # the page at /
    return app
