"""POST /generate: one-shot generation, plain or streamed."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..deps import EngineDep, JSONBody, ModelDep, SettingsDep
from ..native.serving import respond
from ..validate import validate
from ..native.models import STREAM_RESPONSE, ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter(tags=["generation"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 413, 415, 422, 429, 503)}


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses={**ERRORS, **STREAM_RESPONSE}, dependencies=[JSONBody])
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, loaded: ModelDep, settings: SettingsDep):
    """Continue `prompt`. With `stream: true` the answer is Server-Sent Events: `token` events
    `{"index", "text"}`, then one `done` with `finish_reason`, `usage` and `seed`."""
    inputs = body.to_inputs(settings.default_max_new_tokens)
    validated = await validate(inputs, loaded, settings)
    return await respond(engine, validated, body.stream, f"{loaded.name}@{loaded.version}", request,
                         unknown_chars=validated.unknown_report(inputs))
