"""Turning a validated body into an engine request, and engine events into a response or an SSE stream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable

from fastapi import Request
from sse_starlette import EventSourceResponse

from ..engine.engine import Engine, Stream
from ..engine.types import Done, GenerationRequest, Token
from ..sampling import SamplingParams
from ..settings import Settings
from ..store import LoadedModel
from ..vocab import OutOfVocabularyError
from .bridge import Channel, until_client_leaves
from .errors import APIError, error_body
from .schemas import GenerateRequest


def encode_prompt(prompt: str, loaded: LoadedModel, settings: Settings, param: str = "prompt",
                  unknown: str = "error", replacement: str | None = None,
                  hint: str = " (or send unknown_chars: skip or replace)", bound: str = "max_prompt_chars") -> tuple[list[int], int]:
    """The prompt's ids and how many characters the unknown-character policy skipped or replaced.
    `bound`: the setting that limits the length."""
    limit = getattr(settings, bound)
    if len(prompt) > limit:
        raise APIError(422, "invalid_field", f"{param}: {len(prompt)} characters is more than {bound}={limit}", param)
    if replacement is not None and replacement not in loaded.vocab:
        raise APIError(422, "invalid_field", f"replacement: must be one character of the model's vocabulary, not {replacement!r}",
                       "replacement")
    try:
        return loaded.vocab.encode_with_policy(prompt, unknown, replacement)
    except OutOfVocabularyError as e:
        raise APIError(422, "invalid_field", f"{param}: {e}{hint}", param) from None


def check_max_new_tokens(max_new: int, settings: Settings, param: str = "max_new_tokens") -> None:
    if max_new > settings.max_new_tokens:
        raise APIError(422, "invalid_field", f"{param}: {max_new} is more than the limit {settings.max_new_tokens}", param)


def check_request_size(prompt_chars: list[int], choices: int, max_new: int, settings: Settings,
                       logprob_entries: int = 0) -> None:
    """A request's total work and its response's size within their limits. prompt_chars: each prompt's
    length; every prompt runs `choices` streams of up to `max_new` characters. logprob_entries: the
    log-probabilities the response would hold."""
    work = sum(prompt_chars) * choices + len(prompt_chars) * choices * max_new
    if work > settings.request_work_limit:
        raise APIError(422, "request_too_large",
                       f"this request asks for {work} characters of work (prompt characters x choices + characters to generate), "
                       f"more than max_request_work_chars={settings.request_work_limit}: send fewer choices or shorter prompts", None)
    if logprob_entries > settings.max_logprob_entries:
        raise APIError(422, "request_too_large",
                       f"the response would hold {logprob_entries} log-probabilities, more than max_logprob_entries="
                       f"{settings.max_logprob_entries}: ask for fewer alternatives, fewer choices or no echo", "logprobs")


def check_stops(stops: list[str], loaded: LoadedModel, settings: Settings) -> None:
    """Stop strings within the settings' bounds, each one able to match."""
    if len(stops) > settings.max_stop_strings:
        raise APIError(422, "invalid_field", f"stop: {len(stops)} strings is more than max_stop_strings={settings.max_stop_strings}", "stop")
    for i, s in enumerate(stops):
        if not s or len(s) > settings.max_stop_chars:
            raise APIError(422, "invalid_field", f"stop.{i}: stop strings must have 1 to {settings.max_stop_chars} characters", f"stop.{i}")
        unknown = loaded.vocab.unknown_chars(s)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown)
            raise APIError(422, "invalid_field", f"stop.{i}: {s!r} can never match: {shown} is not in the model's vocabulary", f"stop.{i}")


def to_engine_request(body: GenerateRequest, loaded: LoadedModel, settings: Settings) -> tuple[GenerationRequest, int]:
    """Every limit that depends on the settings is checked here, before anything is queued.
    Returns the request and how many prompt characters the unknown-character policy changed."""
    max_new = settings.default_max_new_tokens if body.max_new_tokens is None else body.max_new_tokens
    check_max_new_tokens(max_new, settings)
    stops = body.stop
    check_stops(stops, loaded, settings)
    prompt_ids, changed = encode_prompt(body.prompt, loaded, settings, unknown=body.unknown_chars, replacement=body.replacement)
    check_request_size([len(prompt_ids)], 1, max_new, settings, logprob_entries=max_new if body.logprobs else 0)
    params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                            repetition_penalty=body.repetition_penalty)
    return GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_new, params=params, seed=body.seed,
                             stop=tuple(stops), logprobs=body.logprobs), changed


def response_body(done: Done, model: str, unknown_chars: dict | None = None) -> dict:
    body = {"text": done.text, "finish_reason": done.finish_reason,
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
            "seed": done.seed, "model": model}
    if done.logprobs is not None:
        body["logprobs"] = list(done.logprobs)
    if done.session is not None:
        body["session"] = done.session
    if unknown_chars is not None:
        body["unknown_chars"] = unknown_chars
    return body


def failed(done: Done) -> APIError:
    """A plain request whose stream ended in an internal fault: 503 in the error shape, never 200."""
    if done.error and done.error.startswith("session_store_unavailable"):
        return APIError(503, "session_store_unavailable", done.error.split(": ", 1)[-1], None, {"Retry-After": "1"})
    return APIError(503, "engine_error", done.error or "generation failed on the server", None, {"Retry-After": "1"})


Start = Callable[[Channel], Stream]


async def run_to_completion(engine: Engine, start: Start, request: Request,
                            on_done: Callable[[Done], Awaitable[Done]] | None = None) -> Done | None:
    """Submit via `start(channel)` and wait for Done; if the client leaves first, cancel and return None."""
    channel = Channel(on_done)
    stream = start(channel)
    _, done = await until_client_leaves(request, _until_done(channel), lambda: engine.cancel(stream))
    return done


async def _until_done(channel: Channel) -> Done:
    while True:
        for event in await channel.drain():
            if isinstance(event, Done):
                return event


async def respond(engine: Engine, gen: GenerationRequest, stream: bool, model: str, request: Request,
                  on_done: Callable[[Done], Awaitable[Done]] | None = None, unknown_chars: dict | None = None):
    """The answer to a generate call: an SSE stream, or the whole text once it is done.
    `on_done` finishes the call (a session commits) before the client hears of the end."""
    if stream:
        return stream_response(engine, gen, model, request.app.state.settings.stream_interval_ms / 1000, on_done, unknown_chars)
    plain = dataclasses.replace(gen, stream_tokens=False)  # only its Done is needed
    done = await run_to_completion(engine, lambda ch: engine.submit(plain, ch), request, on_done)
    if done is None:
        raise APIError(499, "client_closed", "the client closed the connection")
    if done.finish_reason == "error":
        raise failed(done)
    return response_body(done, model, unknown_chars)


def stream_response(engine: Engine, gen: GenerationRequest, model: str, interval_s: float,
                    on_done: Callable[[Done], Awaitable[Done]] | None = None, unknown_chars: dict | None = None) -> EventSourceResponse:
    """SSE: `token` events, then `done`; an error after the stream began arrives as an `error` event
    before `done`. The stream always ends. The first characters go out at once; after that, characters
    generated within `interval_s` share one event, which keeps the cost per character low when many
    streams run."""
    channel = Channel(on_done)
    stream = engine.submit(gen, channel)  # refusals raise here, before any byte is sent
    loop = asyncio.get_running_loop()

    async def events():
        finished, next_send = False, 0.0
        try:
            while not finished:
                wait = next_send - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # let characters gather into one event
                batch = await channel.drain()
                next_send = loop.time() + interval_s
                tokens = [e for e in batch if isinstance(e, Token)]
                if tokens:
                    data = {"index": tokens[0].index, "text": "".join(t.text for t in tokens)}
                    if gen.logprobs:
                        data["logprobs"] = [lp for t in tokens for lp in (t.logprobs or ())]
                    yield {"event": "token", "data": json.dumps(data, ensure_ascii=False)}
                for event in batch:
                    if isinstance(event, Done):
                        finished = True
                        if event.finish_reason == "error":
                            err = failed(event)
                            yield {"event": "error", "data": json.dumps(error_body(err.type, err.message))}
                        body = response_body(event, model, unknown_chars)
                        body.pop("text")
                        body.pop("logprobs", None)
                        yield {"event": "done", "data": json.dumps(body, ensure_ascii=False)}
        finally:
            if not finished:
                engine.cancel(stream)  # the client went away: free the row at the next step

    return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
