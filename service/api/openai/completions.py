"""/v1/completions: OpenAI's legacy Completions onto the shared path (validate -> reader -> formatter).

The request model translates itself (`CompletionRequest.to_inputs`); this module adds what only this
route has: `echo`, the completions logprobs object, a native session continued through `session_id`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time

from fastapi import Request

from ...engine.pool import Served
from ...sessions.calls import SessionCall, SessionCalls
from ...engine.types import Alternatives, Done, PromptScored, Token
from ...settings import Settings
from ..errors import APIError
from ..identity import client_of
from ..reader import Choice, Responses
from ..sse import dumps, event_stream
from ..validate import validate
from . import protocol
from .protocol import CompletionRequest
from .serving import check_choices, failure, raise_if_failed, usage


class CompletionFormatter:
    """One completion's identity, its response, and its stream's chunks."""

    sep = "\n"

    def __init__(self, model: str, body: CompletionRequest):
        self.model, self.body = model, body
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        self.choices: list[Choice] = []
        self.failed = False

    def _envelope(self, choices: list[dict], usage_: dict | None = None, final: bool = True) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices}
        if final or (self.body.stream_options is not None and self.body.stream_options.include_usage):
            out["usage"] = usage_
        return out

    def response(self, choices: list[Choice]) -> dict:
        out = []
        for choice in choices:
            done = choice.done
            text, logprobs = done.text, None
            if self.body.logprobs is not None:
                logprobs = _empty_logprobs()
                if self.body.echo:
                    logprobs = prompt_logprobs(choice.prompt, done.prompt, 0)
                logprobs = _merge(logprobs, token_logprobs(done.text, done.logprobs, done.top_logprobs,
                                                           len(choice.prompt) if self.body.echo else 0))
            if self.body.echo:
                text = choice.prompt + text
            out.append({"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": done.finish_reason})
        return self._envelope(out, usage(choices))

    # ------------------------------------------------------------------ the stream (sse.StreamFormatter)
    def chunk(self, choice: Choice, text: str, logprobs: dict | None, finish: str | None) -> dict:
        data = self._envelope([{"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}], final=False)
        return {"data": dumps(data)}

    def opening(self):
        if self.body.echo and self.body.logprobs is None:  # the prompt goes out at once; with logprobs, once it is scored
            for choice in self.choices:
                yield self.chunk(choice, choice.prompt, None, None)
                choice.sent = len(choice.prompt)

    def events(self, choice: Choice, events: list):
        text, logprobs, finish = "", None, None
        for event in events:
            if isinstance(event, PromptScored):  # echo with logprobs: the prompt goes out once it is scored
                logprobs = _merge(logprobs, prompt_logprobs(choice.prompt, event, choice.sent))
                text += choice.prompt
            elif isinstance(event, Token):
                if self.body.logprobs is not None:
                    logprobs = _merge(logprobs, token_logprobs(event.text, event.logprobs, event.top_logprobs, choice.sent + len(text)))
                text += event.text
            elif isinstance(event, Done):
                finish = event.finish_reason
                if finish not in ("length", "stop"):
                    self.failed = True
                    error = failure(event)
                    return [{"data": json.dumps(protocol.error_body(error.status, error.type, error.message))}, {"data": "[DONE]"}]
        choice.sent += len(text)
        return [self.chunk(choice, text, logprobs, finish)] if text or finish else []

    def closing(self):
        if self.body.stream_options is not None and self.body.stream_options.include_usage:
            yield {"data": json.dumps(self._envelope([], usage(self.choices)))}
        yield {"data": "[DONE]"}


def prompt_logprobs(prompt: str, scored: PromptScored, offset: int) -> dict:
    tops = scored.top_logprobs or (None,) * len(scored.logprobs)
    return {"tokens": list(prompt), "token_logprobs": list(scored.logprobs),
            "top_logprobs": [None if lp is None else top(char, lp, alts) for char, lp, alts in zip(prompt, scored.logprobs, tops)],
            "text_offset": list(range(offset, offset + len(prompt)))}


def token_logprobs(text: str, lps: tuple[float, ...] | None, tops: tuple[Alternatives, ...] | None, offset: int) -> dict:
    lps = lps or ()
    tops = tops or (None,) * len(lps)
    return {"tokens": list(text), "token_logprobs": list(lps),
            "top_logprobs": [top(char, lp, alts) for char, lp, alts in zip(text, lps, tops)],
            "text_offset": list(range(offset, offset + len(text)))}


def top(char: str, lp: float, alternatives: Alternatives | None) -> dict[str, float]:
    """The alternatives and the sampled character (always there, as in vLLM), most likely first."""
    merged = dict(alternatives or ())
    merged.setdefault(char, lp)
    return dict(sorted(merged.items(), key=lambda kv: kv[1], reverse=True))


def _empty_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _merge(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: a[k] + b[k] for k in a}


async def create_completion(body: CompletionRequest, request: Request, served: Served, sessions: SessionCalls,
                            settings: Settings):
    """A completion on `served`, the model the request names (a session's, with session_id)."""
    model, loaded, engine = served.ref, served.loaded, served.engine
    inputs = body.to_inputs()
    check_choices(inputs.n, len(inputs.prompts), settings)
    choices = (await validate(inputs, loaded, settings)).choices
    call: SessionCall | None = None
    on_done = None
    if body.session_id is not None:
        if len(choices) > 1:
            raise APIError(400, "invalid_field", "session_id: a session continues one stream: send one prompt and n = 1", "session_id")
        call, choices[0].request = await sessions.begin(body.session_id, choices[0].request)
        on_done = call.finish
    try:
        responses = Responses(engine, choices, client_of(request), on_done)  # every choice or none: one request in the engine's queue
    except BaseException:
        if call is not None:
            with contextlib.suppress(Exception):  # refused: the lease goes back at once
                await call.abandon()
        raise
    formatter = CompletionFormatter(model, body)
    formatter.choices = choices
    if body.stream:
        return event_stream(responses, formatter, settings.stream_interval_ms / 1000)
    for done in await responses.all(request):
        raise_if_failed(done)
    return formatter.response(choices)
