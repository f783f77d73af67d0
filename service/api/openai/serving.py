"""OpenAI's completions translated onto the engine: one GenerationRequest per choice, and the
engine's Token, PromptScored and Done events back into OpenAI's response and chunks.

One serving class per route family, as vLLM's OpenAI server has: `OpenAIServingModels` for
/v1/models, `OpenAIServingCompletion` for /v1/completions. Everything OpenAI-specific (field names,
`n` and list prompts, `echo`, the logprobs object, `[DONE]`) stays in this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime

from fastapi import Request
from sse_starlette import EventSourceResponse

from ...engine.engine import Engine, Stream
from ...engine.session_calls import SessionCall, SessionCalls
from ...engine.types import Alternatives, Done, GenerationRequest, PromptScored, Token
from ...sampling import MAX_SEED, SamplingParams
from ...settings import Settings
from ...store import LoadedModel
from ..bridge import Channel, until_client_leaves
from ..errors import APIError
from ..generation import check_max_new_tokens, check_request_size, check_stops, encode_prompt, failed
from . import protocol
from .protocol import CompletionRequest


def choice_bounds(settings: Settings) -> tuple[int, int]:
    """The most choices per prompt, and the most prompts: together never more streams than the engine
    admits at once, so a request that fits the OpenAPI document is never refused for its size."""
    most_n = min(128, settings.max_batch_size)
    return most_n, max(1, (settings.max_batch_size + settings.max_queue) // most_n)


class OpenAIServingModels:
    """The one model this server runs, under the names a client may use for it."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.id = f"{loaded.name}@{loaded.version}"

    def list(self) -> dict:
        created = self.loaded.card.get("created_at")
        return {"object": "list", "data": [{"id": self.id, "object": "model", "created": _unix(created),
                                            "owned_by": "charlstm"}]}

    def resolve(self, name: str) -> str:
        if name not in (self.id, self.loaded.name):
            raise APIError(404, "model_not_found", f"model: {name!r} is not served here; use {self.id!r} (see /v1/models)",
                           "model")
        return self.id


class _Choice:
    """What one choice needs between submission and answer."""

    def __init__(self, index: int, prompt: str, first: bool, request: GenerationRequest):
        self.index, self.prompt, self.request = index, prompt, request
        self.first = first  # the first choice of its prompt: the prompt's characters count once in `usage`
        self.channel: Channel | None = None
        self.stream: Stream | None = None
        self.done: Done | None = None
        self.sent = 0  # characters of this choice's text already streamed (the echoed prompt included)


class OpenAIServingCompletion:
    def __init__(self, engine: Engine, sessions: SessionCalls, loaded: LoadedModel, settings: Settings):
        self.engine, self.sessions, self.loaded, self.settings = engine, sessions, loaded, settings
        self.models = OpenAIServingModels(loaded)

    # ------------------------------------------------------------------ request -> engine
    def translate(self, body: CompletionRequest) -> list[_Choice]:
        """One engine request per choice, choices ordered prompt by prompt; every check that can fail
        happens here, before anything is queued."""
        prompts, n = body.prompts, body.n or 1
        most_n, most_prompts = choice_bounds(self.settings)
        if n > most_n:
            raise APIError(422, "invalid_field", f"n: {n} is more than {most_n} (max_batch_size)", "n")
        if len(prompts) > most_prompts:
            raise APIError(422, "invalid_field", f"prompt: {len(prompts)} prompts is more than {most_prompts}: "
                           f"(max_batch_size + max_queue) // {most_n} keeps every choice within the engine's queue", "prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        check_max_new_tokens(max_tokens, self.settings, "max_tokens")
        check_stops(body.stop, self.loaded, self.settings)
        top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
        params = SamplingParams(temperature=_or(body.temperature, 1.0), top_k=top_k, top_p=_or(body.top_p, 1.0),
                                repetition_penalty=_or(body.repetition_penalty, 1.0),
                                presence_penalty=_or(body.presence_penalty, 0.0),
                                frequency_penalty=_or(body.frequency_penalty, 0.0), top_logprobs=body.logprobs or 0)
        encoded = []
        for p, prompt in enumerate(prompts):
            param = "prompt" if isinstance(body.prompt, str) else f"prompt.{p}"
            encoded.append(encode_prompt(prompt, self.loaded, self.settings, param=param, hint="")[0])
        lengths = [len(ids) for ids in encoded]
        positions = (sum(lengths) * int(bool(body.echo)) + len(lengths) * max_tokens) * n  # that carry logprobs
        check_request_size(lengths, n, max_tokens, self.settings,
                           logprob_entries=0 if body.logprobs is None else positions * (1 + body.logprobs))
        choices = []
        for prompt, ids in zip(prompts, encoded):
            for j in range(n):
                seed = None if body.seed is None else (body.seed + j) % (MAX_SEED + 1)
                request = GenerationRequest(
                    prompt_ids=ids, max_new_tokens=max_tokens, params=params, seed=seed, stop=tuple(body.stop),
                    logprobs=body.logprobs is not None,
                    prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
                    stream_tokens=bool(body.stream))  # a plain answer needs only each choice's Done
                choices.append(_Choice(len(choices), prompt, j == 0, request))
        return choices

    async def create(self, body: CompletionRequest, request: Request):
        model = self.models.resolve(body.model)
        choices = self.translate(body)
        call: SessionCall | None = None
        if body.session_id is not None:
            call, continued = await self.sessions.begin(body.session_id, choices[0].request)
            choices[0].request = continued
        try:
            if call is not None and len(choices) > 1:
                raise APIError(400, "invalid_field", "session_id: a session continues one stream: send one prompt and n = 1",
                               "session_id")
            self._submit(choices, call.finish if call else None)
        except BaseException:
            if call is not None:
                with contextlib.suppress(Exception):  # refused: the lease goes back at once
                    await call.abandon()
            raise
        completion = _Completion(model, body)
        if body.stream:
            return EventSourceResponse(self._stream(completion, choices), ping=15, sep="\n",
                                       headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        await self._wait(choices, request)
        for choice in choices:
            _raise_if_failed(choice.done)
        return completion.response(choices)

    def _submit(self, choices: list[_Choice], on_done: Callable[[Done], Awaitable[Done]] | None) -> None:
        """Queue every choice, or none, as one request: the engine counts it once in its queue and lets it
        hold at most max_rows_per_request rows at once."""
        for choice in choices:
            choice.channel = Channel(on_done)
        streams = self.engine.submit_all([(choice.request, choice.channel) for choice in choices])
        for choice, stream in zip(choices, streams):
            choice.stream = stream

    def _cancel(self, choices: list[_Choice]) -> None:
        for choice in choices:
            if choice.stream is not None and choice.done is None:
                self.engine.cancel(choice.stream)

    async def _wait(self, choices: list[_Choice], request: Request) -> None:
        """Until every choice is done; a client that leaves first cancels them all."""

        async def collect():
            async with contextlib.aclosing(_events(choices)) as rounds:
                async for ready in rounds:
                    for choice, events in ready:
                        for event in events:
                            if isinstance(event, Done):
                                choice.done = event

        finished, _ = await until_client_leaves(request, collect(), lambda: self._cancel(choices))
        if not finished or not all(c.done for c in choices):
            raise APIError(499, "client_closed", "the client closed the connection")

    async def _stream(self, completion: _Completion, choices: list[_Choice]) -> AsyncIterator[dict]:
        """`data:` chunks as characters come; characters generated within one interval share a chunk.
        An error after the stream began is a chunk with an `error` object; `[DONE]` is always last."""
        interval = self.settings.stream_interval_ms / 1000
        body = completion.body
        try:
            if body.echo and body.logprobs is None:  # the prompt goes out at once; with logprobs, once it is scored
                for choice in choices:
                    yield completion.chunk(choice, choice.prompt, None, None)
                    choice.sent = len(choice.prompt)
            async with contextlib.aclosing(_events(choices)) as rounds:
                async for ready in rounds:
                    for choice, events in ready:
                        chunk, error = completion.stream_chunk(choice, events)
                        if error is not None:
                            yield {"data": json.dumps(protocol.error_body(error.status, error.type, error.message))}
                            yield {"data": "[DONE]"}
                            return
                        if chunk is not None:
                            yield chunk
                    if interval:
                        await asyncio.sleep(interval)  # let the next characters gather
            if body.stream_options is not None and body.stream_options.include_usage:
                yield completion.usage_chunk(choices)
            yield {"data": "[DONE]"}
        finally:
            self._cancel(choices)  # the client went away, or one choice failed: free the rows at the next step


async def _events(choices: list[_Choice]) -> AsyncIterator[list[tuple[_Choice, list]]]:
    """Every choice's events as they arrive, in rounds of the choices that have some, until each has its Done."""
    pending = {asyncio.ensure_future(c.channel.drain()): c for c in choices}
    try:
        while pending:
            ready, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            round_ = []
            for future in sorted(ready, key=lambda f: pending[f].index):
                choice = pending.pop(future)
                events = future.result()
                if not any(isinstance(e, Done) for e in events):
                    pending[asyncio.ensure_future(choice.channel.drain())] = choice
                round_.append((choice, events))
            yield round_
    finally:
        for future in pending:
            future.cancel()


class _Completion:
    """One response's identity and the OpenAI shapes built from engine events."""

    def __init__(self, model: str, body: CompletionRequest):
        self.model, self.body = model, body
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

    def _envelope(self, choices: list[dict], usage: dict | None = None, final: bool = True) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices}
        if final or (self.body.stream_options is not None and self.body.stream_options.include_usage):
            out["usage"] = usage
        return out

    def response(self, choices: list[_Choice]) -> dict:
        out = []
        for choice in choices:
            done = choice.done
            text, logprobs = done.text, None
            if self.body.logprobs is not None:
                logprobs = _empty_logprobs()
                if self.body.echo:
                    logprobs = self.prompt_logprobs(choice.prompt, done.prompt, 0)
                logprobs = _merge_logprobs(logprobs, self.token_logprobs(done.text, done.logprobs, done.top_logprobs,
                                                                        len(choice.prompt) if self.body.echo else 0))
            if self.body.echo:
                text = choice.prompt + text
            out.append({"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": done.finish_reason})
        return self._envelope(out, _usage(choices))

    def chunk(self, choice: _Choice, text: str, logprobs: dict | None, finish: str | None) -> dict:
        data = self._envelope([{"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                              final=False)
        return {"data": json.dumps(data, ensure_ascii=False)}

    def stream_chunk(self, choice: _Choice, events: list) -> tuple[dict | None, APIError | None]:
        """One choice's new events as a chunk (None when they add nothing), or the error that ended it."""
        text, logprobs, finish = "", None, None
        for event in events:
            if isinstance(event, PromptScored):  # echo with logprobs: the prompt goes out once it is scored
                logprobs = _merge_logprobs(logprobs, self.prompt_logprobs(choice.prompt, event, choice.sent))
                text += choice.prompt
            elif isinstance(event, Token):
                if self.body.logprobs is not None:
                    offset = choice.sent + len(text)
                    logprobs = _merge_logprobs(logprobs, self.token_logprobs(event.text, event.logprobs, event.top_logprobs, offset))
                text += event.text
            elif isinstance(event, Done):
                choice.done, finish = event, event.finish_reason
                if finish not in ("length", "stop"):
                    return None, _failure(event)
        choice.sent += len(text)
        return (self.chunk(choice, text, logprobs, finish) if text or finish else None), None

    def usage_chunk(self, choices: list[_Choice]) -> dict:
        return {"data": json.dumps(self._envelope([], _usage(choices)))}

    def prompt_logprobs(self, prompt: str, scored: PromptScored, offset: int) -> dict:
        tops = scored.top_logprobs or (None,) * len(scored.logprobs)
        return {"tokens": list(prompt), "token_logprobs": list(scored.logprobs),
                "top_logprobs": [None if lp is None else _top(char, lp, alts) for char, lp, alts in zip(prompt, scored.logprobs, tops)],
                "text_offset": list(range(offset, offset + len(prompt)))}

    def token_logprobs(self, text: str, lps: tuple[float, ...] | None, tops: tuple[Alternatives, ...] | None,
                       offset: int) -> dict:
        lps = lps or ()
        tops = tops or (None,) * len(lps)
        return {"tokens": list(text), "token_logprobs": list(lps),
                "top_logprobs": [_top(char, lp, alts) for char, lp, alts in zip(text, lps, tops)],
                "text_offset": list(range(offset, offset + len(text)))}


def _top(char: str, lp: float, alternatives: Alternatives | None) -> dict[str, float]:
    """The alternatives and the sampled character (always there, as in vLLM), most likely first."""
    merged = dict(alternatives or ())
    merged.setdefault(char, lp)
    return dict(sorted(merged.items(), key=lambda kv: kv[1], reverse=True))


def _empty_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _merge_logprobs(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: a[k] + b[k] for k in a}


def _usage(choices: list[_Choice]) -> dict:
    """Each prompt counts once however many choices it has, as OpenAI counts it."""
    prompt = sum(c.done.prompt_tokens for c in choices if c.first)
    completion = sum(c.done.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _failure(done: Done) -> APIError:
    if done.finish_reason == "error":
        return failed(done)
    return APIError(503, "shutting_down", "the server is shutting down; the completion did not finish", None, {"Retry-After": "1"})


def _raise_if_failed(done: Done) -> None:
    if done.finish_reason not in ("length", "stop"):
        raise _failure(done)


def _or(value, default):
    return default if value is None else value


def _unix(value) -> int:
    """The model card's creation time (ISO 8601 or unix seconds) as unix seconds; 0 when unknown."""
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    return 0
