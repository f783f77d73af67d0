"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info."""

from __future__ import annotations

from fastapi import APIRouter, Query

from ..deps import JSONBody, PoolDep, SettingsDep
from ..native.models import ErrorResponse
from ..openai.chat import chat_template, render, speakers_for
from ..tokenizer.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChat, TokenizeCompletion, TokenizeResponse,
                                  TokenizerInfo)
from ..validate import check_token_ids, encode_prompt

router = APIRouter(tags=["tokenizer"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 415, 422)}


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True, responses=ERRORS,
             dependencies=[JSONBody])
async def tokenize(body: TokenizeCompletion | TokenizeChat, pool: PoolDep, settings: SettingsDep):
    """The token ids of a prompt, or of a conversation rendered as /v1/chat/completions renders it, in the
    vocabulary of `model` (the default when omitted; read from its card, so the model need not be loaded)."""
    model = pool.catalog.resolve(body.model)
    if isinstance(body, TokenizeChat):
        text, param = render(body.messages, speakers_for(body.speakers, settings, model), settings, body.add_generation_prompt), "messages"
    else:
        text, param = body.prompt, "prompt"
    ids, _ = encode_prompt(text, model, settings, param, hint="")
    out = {"count": len(ids), "max_model_len": settings.max_prompt_chars, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = list(text)
    return out


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, dependencies=[JSONBody])
async def detokenize(body: DetokenizeRequest, pool: PoolDep, settings: SettingsDep):
    """The text of token ids in `model`'s vocabulary; an id outside the vocabulary gets 400."""
    model = pool.catalog.resolve(body.model)
    return {"prompt": model.vocab.decode(check_token_ids(body.tokens, model, settings, "tokens"))}


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses={404: {"model": ErrorResponse}})
async def tokenizer_info(pool: PoolDep, settings: SettingsDep,
                         model: str | None = Query(None, min_length=1, max_length=256, description="the model (default when omitted)")):
    """The vocabulary of `model` (a token is one character), no special tokens, and the chat template."""
    chars = pool.catalog.resolve(model).vocab.chars
    return TokenizerInfo(vocab={c: i for i, c in enumerate(chars)}, vocab_size=len(chars), model_max_length=settings.max_prompt_chars,
                         chat_template=chat_template(settings),
                         default_speakers={"user": settings.chat_user_speaker, "assistant": settings.chat_assistant_speaker})
