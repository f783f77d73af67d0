"""The native protocol's answers: the JSON body of a plain call, and `token` / `done` / `error` events."""

from __future__ import annotations

import json

from ...engine.types import Done, Token
from ..errors import APIError, error_body
from ..reader import Choice
from ..sse import dumps


def failed(done: Done) -> APIError:
    """A plain request whose stream ended in an internal fault: 503 in the error shape, never 200."""
    if done.error and done.error.startswith("session_store_unavailable"):
        return APIError(503, "session_store_unavailable", done.error.split(": ", 1)[-1], None, {"Retry-After": "1"})
    return APIError(503, "engine_error", done.error or "generation failed on the server", None, {"Retry-After": "1"})


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


class NativeStream:
    """`token` events {index, text[, logprobs]}, then one `done`; a fault sends `error` before `done`."""

    sep = "\r\n"

    def __init__(self, model: str, unknown_chars: dict | None = None):
        self.model, self.unknown_chars = model, unknown_chars
        self.failed = False

    def opening(self):
        return ()

    def events(self, choice: Choice, events: list):
        out = []
        tokens = [e for e in events if isinstance(e, Token)]
        if tokens:
            data = {"index": tokens[0].index, "text": "".join(t.text for t in tokens)}
            if choice.request.logprobs:
                data["logprobs"] = [lp for t in tokens for lp in (t.logprobs or ())]
            out.append({"event": "token", "data": dumps(data)})
        for event in events:
            if isinstance(event, Done):
                if event.finish_reason == "error":
                    err = failed(event)
                    out.append({"event": "error", "data": json.dumps(error_body(err.type, err.message))})
                body = response_body(event, self.model, self.unknown_chars)
                body.pop("text")
                body.pop("logprobs", None)
                out.append({"event": "done", "data": dumps(body)})
        return out

    def closing(self):
        return ()
