"""Stateful sessions: the LSTM state and random generator persist between calls."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ...engine.types import EngineError
from ..deps import EngineDep, JSONBody, ModelDep, SettingsDep
from ..errors import APIError, from_engine
from ..generation import encode_prompt, respond, run_to_completion, to_engine_request
from ..schemas import STREAM_RESPONSE, ErrorResponse, GenerateRequest, GenerateResponse, SessionCreate, SessionInfo

router = APIRouter(prefix="/sessions", tags=["sessions"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 409, 413, 415, 422, 429, 503)}


@router.post("", status_code=201, response_model=SessionInfo, responses=ERRORS, dependencies=[JSONBody])
async def create_session(request: Request, engine: EngineDep, loaded: ModelDep, settings: SettingsDep,
                         body: SessionCreate | None = None):
    """Create a session; `prompt` primes its state and `seed` its random generator."""
    body = body or SessionCreate()
    if body.ttl_seconds is not None and body.ttl_seconds > settings.max_session_ttl_s:
        raise APIError(422, "invalid_field", f"ttl_seconds: at most {settings.max_session_ttl_s}", "ttl_seconds")
    prompt_ids = encode_prompt(body.prompt, loaded, settings)
    done = await run_to_completion(engine, lambda ch: engine.create_session(prompt_ids, body.seed, body.ttl_seconds, ch), request)
    if done is None or done.session is None:
        raise APIError(499, "client_closed", "the client closed the connection")
    if done.finish_reason != "length":
        raise APIError(503, "not_ready", "the session could not be primed: the server is shutting down", None, {"Retry-After": "1"})
    return done.session


@router.post("/{session_id}/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses={**ERRORS, **STREAM_RESPONSE}, dependencies=[JSONBody])
async def session_generate(session_id: str, body: GenerateRequest, request: Request, engine: EngineDep,
                           loaded: ModelDep, settings: SettingsDep):
    """Feed `prompt` after the session's state, generate, and keep the advanced state for the next call.
    A second call while one is running gets 409 `session_busy`."""
    gen = to_engine_request(body, loaded, settings, session_id=session_id)
    return await respond(engine, gen, body.stream, f"{loaded.name}@{loaded.version}", request)


@router.get("/{session_id}", response_model=SessionInfo, responses={404: {"model": ErrorResponse}})
async def get_session(session_id: str, engine: EngineDep):
    try:
        return engine.sessions.get(session_id).metadata()
    except EngineError as e:
        raise from_engine(e) from None


@router.delete("/{session_id}", status_code=204, responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
async def delete_session(session_id: str, engine: EngineDep):
    try:
        engine.sessions.delete(session_id)
    except EngineError as e:
        raise from_engine(e) from None
    return Response(status_code=204)
