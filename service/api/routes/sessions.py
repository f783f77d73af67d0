"""Stateful sessions: the LSTM state and random generator persist between calls."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, Request, Response

from ...sessions import blob as session_blob
from ...engine.types import GenerationRequest
from ...engine.pool import ModelPool
from ...sessions.records import SessionRecord
from ..deps import JSONBody, PoolDep, SessionsDep, SettingsDep, model_for, session_model, session_quota
from ..services import services_of
from ..errors import APIError
from ..native.formatter import failed
from ..native.serving import respond
from ..reader import run_one
from ..validate import encode_prompt, validate
from ..native.models import (DURABLE_HEADER, SESSION_FORMAT, STREAM_RESPONSE, ErrorResponse, GenerateRequest, GenerateResponse, SessionCreate,
                       SessionExport, SessionFork, SessionImport, SessionInfo)

router = APIRouter(prefix="/sessions", tags=["sessions"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 409, 413, 415, 422, 429, 503)}
Quota = Depends(session_quota)  # creating, importing and forking make a session: per-client rate


def check_ttl(ttl_seconds: float | None, settings) -> None:
    if ttl_seconds is not None and ttl_seconds > settings.max_session_ttl_s:
        raise APIError(422, "invalid_field", f"ttl_seconds: must be at most max_session_ttl_s={settings.max_session_ttl_s:g}",
                       "ttl_seconds")


@router.post("", status_code=201, response_model=SessionInfo, responses=ERRORS, dependencies=[JSONBody, Quota])
async def create_session(request: Request, pool: PoolDep, sessions: SessionsDep, settings: SettingsDep,
                         body: SessionCreate | None = None):
    """Create a session on the model `model` names (the default when omitted): it belongs to that model for
    good. `prompt` primes its state (an empty prompt feeds the start character, so a new session is at
    position 1) and `seed` its random generator."""
    body = body or SessionCreate()
    check_ttl(body.ttl_seconds, settings)
    async with model_for(pool, body.model) as served:
        prompt_ids, _ = encode_prompt(body.prompt, served.loaded, settings, unknown=body.unknown_chars, replacement=body.replacement)
        priming = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=0, seed=body.seed, return_state=True)
        done = await run_one(served.engine, priming, request)
    if done.finish_reason == "error":
        raise failed(done)
    if not done.completed:
        raise APIError(503, "not_ready", "the session could not be primed: the server is shutting down", None, {"Retry-After": "1"})
    return describe(*await sessions.create(done, body.ttl_seconds, served.model.fingerprint), pool=pool)


@router.post("/import", status_code=201, response_model=SessionInfo, responses=ERRORS, dependencies=[JSONBody, Quota])
async def import_session(body: SessionImport, request: Request, pool: PoolDep, sessions: SessionsDep, settings: SettingsDep):
    """A new session from an export (`data` at least): it continues exactly where the exported one
    stood, on the model whose weights the blob names (or `model`, which must be that one). The id is
    new. 422 `invalid_session_blob` for a blob that was changed, cut, signed with another key or holds
    impossible values; 409 `model_mismatch` for a session of weights that are not `model`'s or not served."""
    check_ttl(body.ttl_seconds, settings)
    key = services_of(request.app).session_key
    ref = body.model if body.model is not None else blob_model(body.data, key, pool)
    model = pool.catalog.resolve(ref)  # the metadata the check needs; the model itself is not loaded
    cfg = model.card["config"]
    record, durable = await sessions.import_blob(body.data, key, model=model.ref, fingerprint=model.fingerprint,
                                        layers=cfg["num_layers"], hidden=cfg["hidden_size"], ttl_s=body.ttl_seconds,
                                        position=body.position)
    return describe(record, durable, pool=pool)


@router.get("/{session_id}/export", response_model=SessionExport, responses={s: {"model": ErrorResponse} for s in (404, 503)})
async def export_session(session_id: str, request: Request, pool: PoolDep, sessions: SessionsDep):
    """The session as a signed value to keep, move to another server with the same weights and key, or
    continue offline (`charlstm sample --session-in`). A call running on the session is not in it."""
    record, blob = await sessions.export(session_id, services_of(request.app).session_key)
    model = pool.served_for_fingerprint(record.model)
    served = pool.loaded.get(model.ref) if model else None  # its backend, when it is loaded now (it usually is)
    return SessionExport(format=SESSION_FORMAT, model=model.ref if model else f"weights {record.model[:12]}",
                         position=record.position, backend=served.details["backend"]["name"] if served else None,
                         data=session_blob.to_text(blob))


@router.post("/{session_id}/fork", status_code=201, response_model=SessionInfo, responses=ERRORS, dependencies=[JSONBody, Quota])
async def fork_session(session_id: str, pool: PoolDep, sessions: SessionsDep, settings: SettingsDep,
                       body: SessionFork | None = None):
    """A new session with the same state, seed, counter and position: the two continue identically
    until their calls differ. Forking before a call is how a client rewinds. 409 `session_busy` while
    a call runs on the session."""
    body = body or SessionFork()
    check_ttl(body.ttl_seconds, settings)
    return describe(*await sessions.fork(session_id, body.ttl_seconds), pool=pool)


@router.post("/{session_id}/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses={**ERRORS, **STREAM_RESPONSE}, dependencies=[JSONBody])
async def session_generate(session_id: str, body: GenerateRequest, request: Request, pool: PoolDep,
                           sessions: SessionsDep, settings: SettingsDep):
    """Feed `prompt` after the session's state, generate with the session's model, and keep the advanced
    state for the next call. A second call while one is running gets 409 `session_busy`. A `seed`
    re-seeds the session: its random stream restarts there, and the response's `seed` is the one in force."""
    inputs = body.to_inputs(settings.default_max_new_tokens)
    ref = await session_model(session_id, body.model, sessions, pool)
    async with model_for(pool, ref) as served:
        validated = await validate(inputs, served.loaded, settings)
        choice = validated.choices[0]
        call, choice.request = await sessions.begin(session_id, choice.request)
        try:
            return await respond(served.engine, validated, body.stream, served.ref, request, call.finish,
                                 validated.unknown_report(inputs))
        except BaseException:
            with contextlib.suppress(Exception):  # never submitted, or refused: the lease goes back at once (a no-op after a commit)
                await call.abandon()
            raise


@router.get("/{session_id}", response_model=SessionInfo, responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def get_session(session_id: str, pool: PoolDep, sessions: SessionsDep):
    record, busy = await sessions.metadata(session_id)
    return describe(record, pool=pool, busy=busy)


@router.delete("/{session_id}", status_code=204, responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                                                              503: {"model": ErrorResponse}})
async def delete_session(session_id: str, sessions: SessionsDep):
    durable = await sessions.delete(session_id)
    return Response(status_code=204, headers={DURABLE_HEADER: str(durable).lower()})


def describe(record: SessionRecord, durable: bool | None = None, *, pool: ModelPool, busy: bool = False) -> dict:
    """A session's metadata, with the model it belongs to by name (null for weights not served here) and,
    in the answer to a change, whether the change is durable."""
    model = pool.served_for_fingerprint(record.model)
    return {**record.metadata(busy), "model": model.ref if model else None, "durable": durable}


def blob_model(data: str, key: bytes, pool: ModelPool) -> str | None:
    """The served model whose weights an export names (its tag checked first); None: the default, whose
    mismatch the import then reports by name."""
    try:
        sha = session_blob.decode(session_blob.from_text(data), key).fingerprint
    except session_blob.InvalidSessionBlob:
        return None  # the import's own check reports what is wrong with it
    model = pool.served_for_fingerprint(sha)
    return model.ref if model else None
