"""The OpenAI-compatible routes: GET /v1/models and /v1/models/{id}, POST /v1/completions and /v1/chat/completions (see service/api/openai/)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..deps import JSONBody, PoolDep, SessionsDep, SettingsDep, model_for, session_model
from ..openai.chat import create_chat_completion as serve_chat
from ..openai.protocol import (STREAM_RESPONSE, V1_PREFIX, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                               CompletionResponse, ModelCard, ModelList, OpenAIErrorResponse)
from ..openai.completions import create_completion as serve_completion
from ..openai.serving import OpenAIServingModels

router = APIRouter(prefix=V1_PREFIX, tags=["openai"])

ERRORS = {s: {"model": OpenAIErrorResponse} for s in (400, 401, 404, 409, 413, 415, 422, 429, 503)}


@router.get("/models", response_model=ModelList, responses={401: {"model": OpenAIErrorResponse}})
async def list_models(pool: PoolDep):
    """Every model this server serves (loaded now or on first use); a bare name is accepted as `model` too."""
    return OpenAIServingModels(pool.catalog).list()


@router.get("/models/{model_id}", response_model=ModelCard, responses={401: {"model": OpenAIErrorResponse},
                                                                   404: {"model": OpenAIErrorResponse}})
async def retrieve_model(model_id: str, pool: PoolDep):
    """One model (OpenAI's `models.retrieve`): `name@version`, or a bare name for its newest version."""
    return OpenAIServingModels(pool.catalog).retrieve(model_id)


@router.post("/completions", response_model=CompletionResponse, responses={**ERRORS, **STREAM_RESPONSE},
             dependencies=[JSONBody])
async def create_completion(body: CompletionRequest, request: Request, pool: PoolDep, sessions: SessionsDep,
                            settings: SettingsDep):
    """OpenAI's legacy Completions API, one token per character. With `stream: true`: `data:` chunks,
    then `data: [DONE]`. Extensions through the body: `top_k`, `repetition_penalty`, `session_id`."""
    ref = body.model if body.session_id is None else await session_model(body.session_id, body.model, sessions, pool)
    async with model_for(pool, ref) as served:
        return await serve_completion(body, request, served, sessions, settings)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, **STREAM_RESPONSE},
             dependencies=[JSONBody])
async def create_chat_completion(body: ChatCompletionRequest, request: Request, pool: PoolDep, settings: SettingsDep):
    """OpenAI's Chat Completions over a play-script template (see /tokenizer_info's `chat_template`): each
    message is a speech, and the model writes the assistant's next one. Extensions through the body:
    `speakers`, `top_k`, `repetition_penalty`, `unknown_chars`, `structured_outputs`."""
    async with model_for(pool, body.model) as served:
        return await serve_chat(body, request, served, settings)
