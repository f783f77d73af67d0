"""POST /generate: one-shot generation, plain or streamed."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..deps import JSONBody, PoolDep, SettingsDep, model_for
from ..native.serving import respond
from ..validate import validate
from ..native.models import STREAM_RESPONSE, ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter(tags=["generation"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 415, 422, 429, 503)}


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses={**ERRORS, **STREAM_RESPONSE}, dependencies=[JSONBody])
async def generate(body: GenerateRequest, request: Request, pool: PoolDep, settings: SettingsDep):
    """Continue `prompt` with the model `model` names (loaded now if it is not). With `stream: true` the answer
    is Server-Sent Events: `token` events `{"index", "text"}`, then one `done` with `finish_reason`, `usage` and `seed`."""
    inputs = body.to_inputs(settings.default_max_new_tokens)
    async with model_for(pool, body.model) as served:
        validated = await validate(inputs, served.loaded, settings)
        return await respond(served.engine, validated, body.stream, served.ref, request,
                             unknown_chars=validated.unknown_report(inputs))
