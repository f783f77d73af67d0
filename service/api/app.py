"""The FastAPI application: routes, middleware and the error shape. It serves with the services the
composition root (service/server.py) builds and runs in the app's lifespan; nothing heavy happens at import.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..settings import Settings
from . import docs, errors, openapi
from .auth import APIKeyAuth, TrustedHosts
from .identity import Keys, keys_for
from .limits import BodyLimit
from .routes import generate, models, playground, probes, score, sessions, tokenizer, v1
from .services import Services

ServicesFor = Callable[[Settings], AbstractAsyncContextManager[Services]]


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = app.state.settings = app.state.settings or Settings()
    async with app.state.run_services(settings) as services:
        app.state.services = services
        yield


def keys_of(settings: Settings) -> Keys:
    """The API keys the server accepts (identity.py; read once and kept)."""
    return keys_for(settings.api_key, str(settings.api_keys_file) if settings.api_keys_file else None)


def create_app(run_services: ServicesFor, settings: Settings | None = None) -> FastAPI:
    """run_services(settings): the services, started on entering and shut down on leaving (the root's).
    settings: None reads them from the environment when the app starts."""
    # FastAPI's own OpenTelemetry is off: the server's numbers go to Prometheus (service/metrics.py), and with it
    # on, every request asks OpenTelemetry for a provider, which reads the process's environment each time
    app = FastAPI(title="charlstm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Character-level LSTM text generation with continuous batching, streaming and sessions.",
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.settings = settings
    app.state.run_services = run_services
    app.state.services = None
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
