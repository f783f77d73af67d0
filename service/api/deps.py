"""Dependencies shared by the routes: the model a request names and its engine, the settings, and checks
made before work is queued."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request

from ..engine.engine import Engine
from ..engine.pool import ModelPool, Served
from ..sessions.calls import SessionCalls
from ..settings import Settings
from .errors import APIError
from .identity import client_of
from .services import services_of


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_pool(request: Request) -> ModelPool:
    services = services_of(request.app)
    pool = services.pool if services is not None else None
    if pool is None or not pool.started:
        raise APIError(503, "not_ready", "the model is not loaded or the server is shutting down", None, {"Retry-After": "1"})
    return pool


@asynccontextmanager
async def model_for(pool: ModelPool, ref: str | None) -> AsyncIterator[Served]:
    """The loaded model `ref` names (None: the default), loaded now if it is not, pinned while the block runs,
    and refused as a whole (503) when its engine cannot take work."""
    async with pool.use(ref) as served:
        check_engine(served.engine)
        yield served


def check_engine(engine: Engine) -> Engine:
    snap = engine.snapshot()
    if snap.failed:
        raise APIError(503, "engine_error", "the engine stopped after an internal error; the server must be restarted",
                       None, {"Retry-After": "5"})
    if not snap.ready:
        raise APIError(503, "not_ready", "the model is not loaded or the server is shutting down", None, {"Retry-After": "1"})
    return engine


async def session_model(session_id: str, named: str | None, sessions: SessionCalls, pool: ModelPool) -> str:
    """The model a session call runs on: the session's own. Naming another is 409 model_mismatch."""
    sha = await sessions.model_of(session_id)
    model = pool.served_for_fingerprint(sha)
    if model is None:
        raise APIError(409, "model_mismatch", f"session {session_id[:4]}… belongs to a model this server does not serve "
                       f"(weights {sha[:12]}); continue it where that model is served", "model")
    if named is not None and pool.catalog.resolve(named).ref != model.ref:
        raise APIError(409, "model_mismatch", f"model: the session belongs to {model.ref}, not {named!r}; "
                       "omit model to continue it", "model")
    return model.ref


async def get_sessions(request: Request) -> SessionCalls:
    services = services_of(request.app)
    sessions = services.sessions if services is not None else None
    if sessions is None:
        raise APIError(503, "not_ready", "the server is starting", None, {"Retry-After": "1"})
    return sessions


async def require_json(request: Request) -> None:
    """Bodies are JSON: anything else gets 415 rather than a confusing validation error."""
    if request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers:
        return
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
        raise APIError(415, "unsupported_media_type", f"send the body as application/json, not {ctype or 'no content type'}")


async def session_quota(request: Request) -> None:
    """A dependency of the routes that make a session: 429 with Retry-After once the client's bucket is empty."""
    services = services_of(request.app)
    if services is None:
        return
    quotas = services.session_quotas
    wait = quotas.take(client_of(request).id)
    if wait > 0:
        services.events.on_rejected("rate_limited")  # counted with the other refusals
        raise APIError(429, "rate_limited", f"this client makes sessions faster than session_create_rate="
                       f"{quotas.rate:g}/s (burst {quotas.burst}); retry in {wait:.1f} s", None,
                       {"Retry-After": str(max(1, math.ceil(wait)))})


SettingsDep = Annotated[Settings, Depends(get_settings)]
PoolDep = Annotated[ModelPool, Depends(get_pool)]
SessionsDep = Annotated[SessionCalls, Depends(get_sessions)]
JSONBody = Depends(require_json)
