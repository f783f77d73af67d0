"""POST /score: the log-probability of every character of a text, through the batched engine."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...engine.types import GenerationRequest
from ...model.scores import Score
from ..deps import JSONBody, PoolDep, SessionsDep, SettingsDep, model_for, session_model
from ..native.formatter import failed
from ..reader import run_one
from ..validate import encode_prompt
from ..native.models import ErrorResponse, ScoreRequest, ScoreResponse

router = APIRouter(tags=["scoring"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 415, 422, 429, 503)}


@router.post("/score", response_model=ScoreResponse, response_model_exclude_unset=True, responses=ERRORS,
             dependencies=[JSONBody])
async def score(body: ScoreRequest, request: Request, pool: PoolDep, sessions: SessionsDep, settings: SettingsDep):
    """log p(character | everything before it) for every character of `text` after the first, under the
    model `model` names: the figure `charlstm evaluate` reports. After a session's state (on the session's
    model) every character counts, and the session is not advanced. The text shares the engine with running
    streams in bounded slices like any prompt."""
    ref = body.model
    if body.session_id is not None:
        ref = await session_model(body.session_id, body.model, sessions, pool)
    async with model_for(pool, ref) as served:
        ids, changed = encode_prompt(body.text, served.loaded, settings, "text", body.unknown_chars, body.replacement,
                                     bound="max_score_chars")
        state = None
        if body.session_id is not None:
            state = (await sessions.run("get", sessions.store.get, body.session_id)).state  # a copy: the session stays where it was
        k = body.top_logprobs or 0
        lps, tops = [], []
        if ids:
            gen = GenerationRequest(prompt_ids=ids, max_new_tokens=0, state=state, prompt_logprobs=k)
            done = await run_one(served.engine, gen, request)
            if not done.completed or done.prompt is None:
                raise failed(done)
            skip = 0 if state is not None else 1  # a new stream's first character has no context
            lps = list(done.prompt.logprobs[skip:])
            tops = [dict(alts) for alts in done.prompt.top_logprobs[skip:]] if k else []
    scored = Score.of([lps])  # the sum every scorer's figure is (service/model/scores.py)
    out = {"chars": scored.chars, "nats_per_char": scored.nats_per_char if lps else None,
           "bits_per_char": scored.bits_per_char if lps else None, "logprobs": lps}
    if body.top_logprobs is not None:
        out["top_logprobs"] = tops
    if body.unknown_chars != "error":
        out["unknown_chars"] = {"policy": body.unknown_chars, "count": changed}
    return out
