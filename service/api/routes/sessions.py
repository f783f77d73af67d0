"""Stateful sessions: the LSTM state and random generator persist between calls."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, Request, Response

from ...sessions import blob as session_blob
from ...engine.types import GenerationRequest
from ..deps import EngineDep, JSONBody, ModelDep, SessionsDep, SettingsDep
from ..errors import APIError
from ..quotas import session_quota
from ..native.formatter import failed
from ..native.serving import respond
from ..reader import run_one
from ..validate import encode_prompt, validate
from ..native.models import (SESSION_FORMAT, STREAM_RESPONSE, ErrorResponse, GenerateRequest, GenerateResponse, SessionCreate,
                       SessionExport, SessionFork, SessionImport, SessionInfo)

router = APIRouter(prefix="/sessions", tags=["sessions"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 409, 413, 415, 422, 429, 503)}
Quota = Depends(session_quota)  # creating, importing and forking make a session: per-client rate


def check_ttl(ttl_seconds: float | None, settings) -> None:
    if ttl_seconds is not None and ttl_seconds > settings.max_session_ttl_s:
        raise APIError(422, "invalid_field", f"ttl_seconds: must be at most max_session_ttl_s={settings.max_session_ttl_s:g}",
                       "ttl_seconds")


@router.post("", status_code=201, response_model=SessionInfo, responses=ERRORS, dependencies=[JSONBody, Quota])
async def create_session(request: Request, engine: EngineDep, sessions: SessionsDep, loaded: ModelDep,
                         settings: SettingsDep, body: SessionCreate | None = None):
    """Create a session; `prompt` primes its state (an empty prompt feeds the start character, so a
    new session is at position 1) and `seed` its random generator."""
    body = body or SessionCreate()
    check_ttl(body.ttl_seconds, settings)
    prompt_ids, _ = encode_prompt(body.prompt, loaded, settings, unknown=body.unknown_chars, replacement=body.replacement)
    priming = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=0, seed=body.seed, return_state=True)
    done = await run_one(engine, priming, request)
    if done.finish_reason == "error":
        raise failed(done)
    if not done.completed:
        raise APIError(503, "not_ready", "the session could not be primed: the server is shutting down", None, {"Retry-After": "1"})
    return await sessions.create(done, body.ttl_seconds)


@router.post("/import", status_code=201, response_model=SessionInfo, responses=ERRORS, dependencies=[JSONBody, Quota])
async def import_session(body: SessionImport, request: Request, sessions: SessionsDep, loaded: ModelDep, settings: SettingsDep):
    """A new session from an export (`data` at least): it continues exactly where the exported one
    stood. The id is new. 422 `invalid_session_blob` for a blob that was changed, cut, signed with
    another key or holds impossible values; 409 `model_mismatch` for a session of other weights."""
    check_ttl(body.ttl_seconds, settings)
    cfg = loaded.model.config
    return await sessions.import_blob(body.data, request.app.state.session_key, model=f"{loaded.name}@{loaded.version}",
                                      layers=cfg.num_layers, hidden=cfg.hidden_size, ttl_s=body.ttl_seconds,
                                      position=body.position)


@router.get("/{session_id}/export", response_model=SessionExport, responses={s: {"model": ErrorResponse} for s in (404, 503)})
async def export_session(session_id: str, request: Request, sessions: SessionsDep, loaded: ModelDep):
    """The session as a signed value to keep, move to another server with the same weights and key, or
    continue offline (`charlstm sample --session-in`). A call running on the session is not in it."""
    record, blob = await sessions.export(session_id, request.app.state.session_key)
    return SessionExport(format=SESSION_FORMAT, model=f"{loaded.name}@{loaded.version}", position=record.position,
                         data=session_blob.to_text(blob))


@router.post("/{session_id}/fork", status_code=201, response_model=SessionInfo, responses=ERRORS, dependencies=[JSONBody, Quota])
async def fork_session(session_id: str, sessions: SessionsDep, settings: SettingsDep, body: SessionFork | None = None):
    """A new session with the same state, seed, counter and position: the two continue identically
    until their calls differ. Forking before a call is how a client rewinds. 409 `session_busy` while
    a call runs on the session."""
    body = body or SessionFork()
    check_ttl(body.ttl_seconds, settings)
    return await sessions.fork(session_id, body.ttl_seconds)


@router.post("/{session_id}/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses={**ERRORS, **STREAM_RESPONSE}, dependencies=[JSONBody])
async def session_generate(session_id: str, body: GenerateRequest, request: Request, engine: EngineDep,
                           sessions: SessionsDep, loaded: ModelDep, settings: SettingsDep):
    """Feed `prompt` after the session's state, generate, and keep the advanced state for the next call.
    A second call while one is running gets 409 `session_busy`. A `seed` re-seeds the session: its
    random stream restarts there, and the response's `seed` is the one in force."""
    inputs = body.to_inputs(settings.default_max_new_tokens)
    validated = await validate(inputs, loaded, settings)
    choice = validated.choices[0]
    call, choice.request = await sessions.begin(session_id, choice.request)
    try:
        return await respond(engine, validated, body.stream, f"{loaded.name}@{loaded.version}", request, call.finish,
                             validated.unknown_report(inputs))
    except BaseException:
        with contextlib.suppress(Exception):  # never submitted, or refused: the lease goes back at once (a no-op after a commit)
            await call.abandon()
        raise


@router.get("/{session_id}", response_model=SessionInfo, responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def get_session(session_id: str, sessions: SessionsDep):
    return await sessions.metadata(session_id)


@router.delete("/{session_id}", status_code=204, responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                                                              503: {"model": ErrorResponse}})
async def delete_session(session_id: str, sessions: SessionsDep):
    await sessions.delete(session_id)
    return Response(status_code=204)
