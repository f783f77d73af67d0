"""/v1/chat/completions over a play-script template, on the shared path (validate -> reader -> formatter).

The model was trained on plays, where a speech is a speaker's name in capitals with a colon, the lines,
and a blank line. So a conversation is written as one: each message becomes `SPEAKER:\\n<text>\\n\\n`,
system (and developer) messages become a prologue of plain text at the top, and the prompt ends with the
assistant's speaker line. The model then writes that speaker's speech, which ends at its blank line
(the next speaker's line would follow it) or at a stop string. The template is Jinja, rendered in a
sandbox here and published as it is by /tokenizer_info, so a client that renders it itself (lm-eval's
remote tokenizer) gets the same text.
"""

from __future__ import annotations

import functools
import json
import secrets
import time

from fastapi import Request
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ...engine.pool import Served
from ...engine.types import Alternatives, Done, Token
from ...settings import Settings
from ...model.store import LoadedModel
from ...model.vocab import OutOfVocabularyError
from ..errors import APIError
from ..identity import client_of
from ..reader import Choice, Responses
from ..sse import dumps, event_stream
from ..validate import validate
from . import protocol
from .protocol import ChatCompletionRequest, ChatMessage
from .serving import check_choices, failure, raise_if_failed, usage

TEMPLATE = """{%- set speakers = speakers if speakers is defined else DEFAULTS -%}
{%- for message in messages -%}
{%- if message['role'] in ('system', 'developer') -%}
{{ message['content'] }}{{ '\\n\\n' }}
{%- else -%}
{{ speakers[message['role']] }}{{ ':\\n' }}{{ message['content'] }}{{ '\\n\\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt is not defined or add_generation_prompt -%}
{{ speakers['assistant'] }}{{ ':\\n' }}
{%- endif -%}"""


def chat_template(settings: Settings) -> str:
    """The template with this server's default speakers written in (what /tokenizer_info shows)."""
    defaults = {"user": settings.chat_user_speaker, "assistant": settings.chat_assistant_speaker}
    return TEMPLATE.replace("DEFAULTS", json.dumps(defaults, ensure_ascii=False))


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    return ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(template)


def speakers_for(body_speakers, settings: Settings, loaded: LoadedModel) -> dict[str, str]:
    """The speakers of this conversation: the request's, else the server's; each written in the vocabulary."""
    speakers = {"user": settings.chat_user_speaker, "assistant": settings.chat_assistant_speaker}
    if body_speakers is not None:
        speakers.update({k: v for k, v in body_speakers.model_dump().items() if v is not None})
    for role, name in speakers.items():
        unknown = loaded.vocab.unknown_chars(name)
        if unknown or "\n" in name or ":" in name:
            raise APIError(400, "invalid_field", f"speakers.{role}: {name!r} cannot be a speaker line "
                           f"({'it holds ' + ', '.join(map(repr, unknown)) + ', not in the vocabulary' if unknown else 'no newline or colon'})",
                           f"speakers.{role}")
    return speakers


def render(messages: list[ChatMessage], speakers: dict[str, str], settings: Settings, add_generation_prompt: bool = True) -> str:
    """The conversation as a play script, ending with the assistant's speaker line."""
    plain = [{"role": m.role, "content": m.text} for m in messages]
    return _compiled(chat_template(settings)).render(messages=plain, speakers=speakers, add_generation_prompt=add_generation_prompt)


class ChatFormatter:
    """One chat completion's identity, its response, and its stream's chunks (`chat.completion.chunk`)."""

    sep = "\n"

    def __init__(self, model: str, body: ChatCompletionRequest, choices: list[Choice]):
        self.model, self.body, self.choices = model, body, choices
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        self.failed = False
        self.with_usage = body.stream_options is not None and body.stream_options.include_usage

    def _logprobs(self, text: str, lps, tops) -> dict | None:
        if not self.body.logprobs:
            return None
        want = self.body.top_logprobs or 0
        tops = tops or (None,) * len(lps or ())
        return {"content": [{"token": c, "logprob": lp, "bytes": list(c.encode()),
                             "top_logprobs": [_entry(t, v) for t, v in _top(alts)[:want]] if want else []}
                            for c, lp, alts in zip(text, lps or (), tops)]}

    def response(self) -> dict:
        out = []
        for choice in self.choices:
            done = choice.done
            out.append({"index": choice.index, "message": {"role": "assistant", "content": done.text},
                        "logprobs": self._logprobs(done.text, done.logprobs, done.top_logprobs), "finish_reason": done.finish_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model, "choices": out,
                "usage": usage(self.choices)}

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices}
        if self.with_usage:
            data["usage"] = usage_
        return {"data": dumps(data)}

    def opening(self):
        for choice in self.choices:  # the role goes first, as OpenAI sends it
            yield self.chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])

    def events(self, choice: Choice, events: list):
        out = []
        tokens = [e for e in events if isinstance(e, Token)]
        if tokens:
            text = "".join(t.text for t in tokens)
            lps = [lp for t in tokens for lp in (t.logprobs or ())]
            tops = [a for t in tokens for a in (t.top_logprobs or ())] or None
            out.append(self.chunk([{"index": choice.index, "delta": {"content": text},
                                    "logprobs": self._logprobs(text, lps, tops), "finish_reason": None}]))
        for event in events:
            if isinstance(event, Done):
                if event.finish_reason not in ("length", "stop"):
                    self.failed = True
                    error = failure(event)
                    return [{"data": json.dumps(protocol.error_body(error.status, error.type, error.message))}, {"data": "[DONE]"}]
                out.append(self.chunk([{"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}]))
        return out

    def closing(self):
        if self.with_usage:
            yield self.chunk([], usage(self.choices))
        yield {"data": "[DONE]"}


def _top(alternatives: Alternatives | None) -> list[tuple[str, float]]:
    return sorted(alternatives or (), key=lambda kv: kv[1], reverse=True)


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


async def create_chat_completion(body: ChatCompletionRequest, request: Request, served: Served, settings: Settings):
    """A chat completion on `served`, the model the request names."""
    model, loaded, engine = served.ref, served.loaded, served.engine
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "invalid_field", "top_logprobs: needs logprobs: true", "top_logprobs")
    speakers = speakers_for(body.speakers, settings, loaded)
    if body.unknown_chars == "error":  # named by message and position in it, not in the rendered prompt
        for i, message in enumerate(body.messages):
            if unknown := loaded.vocab.unknown_chars(message.text):
                raise APIError(422, "invalid_field", f"messages.{i}.content: {OutOfVocabularyError(unknown)} "
                               "(or send unknown_chars: skip or replace)", f"messages.{i}.content")
    prompt = render(body.messages, speakers, settings)
    inputs = body.to_inputs(prompt, settings.default_max_new_tokens)
    check_choices(inputs.n, 1, settings)
    choices = (await validate(inputs, loaded, settings)).choices
    responses = Responses(engine, choices, client_of(request))  # every choice or none: one request in the engine's queue
    formatter = ChatFormatter(model, body, choices)
    if body.stream:
        return event_stream(responses, formatter, settings.stream_interval_ms / 1000)
    for done in await responses.all(request):
        raise_if_failed(done)
    return formatter.response()
