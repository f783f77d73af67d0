"""The native protocol onto the engine: a validated call answered as one JSON body or as an SSE stream."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from fastapi import Request

from ...engine.engine import Engine
from ...engine.types import Done
from ..identity import client_of
from ..reader import Responses
from ..sse import event_stream
from ..validate import Validated
from .formatter import NativeStream, failed, response_body


async def respond(engine: Engine, validated: Validated, stream: bool, model: str, request: Request,
                  on_done: Callable[[Done], Awaitable[Done]] | None = None, unknown_chars: dict | None = None):
    """The answer to a generate call (one choice). `on_done` finishes the call (a session commits)
    before the client hears of the end."""
    choice = validated.choices[0]
    if stream:
        responses = Responses(engine, [choice], client_of(request), on_done)  # refusals raise here, before any byte is sent
        return event_stream(responses, NativeStream(model, unknown_chars), request.app.state.settings.stream_interval_ms / 1000)
    choice.request = dataclasses.replace(choice.request, stream_tokens=False)  # only its Done is needed
    done = (await Responses(engine, [choice], client_of(request), on_done).all(request))[0]
    if done.finish_reason == "error":
        raise failed(done)
    return response_body(done, model, unknown_chars)
