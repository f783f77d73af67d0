"""A cap on request body size, enforced before the body is parsed (pure ASGI, so streams pass untouched): a declared
Content-Length is checked at once, a chunked body counted as it is read."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_content


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: Callable[[], int]):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, path = self.limit(), scope.get("path", "")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _reject(send, path, 400, "invalid_request", "Content-Length is not a number")
                if declared > limit:
                    return await _too_large(send, path, limit)
                # the parser reads no more than the declared length: nothing to count, and a stream's every
                # message goes out without another wrapper
                return await self.app(scope, receive, send)
        seen, exceeded, replied = 0, False, False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            # FastAPI turns any error while it reads the body into its own 400 ("There was an error
            # parsing the body"): once the limit is passed, whatever the app answers becomes the 413.
            nonlocal replied
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start" and not replied:
                replied = True
                await _too_large(send, path, limit)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:  # _TooLarge itself, or what the app made of it
            if not exceeded:
                raise
        if exceeded and not replied:  # the body is read before any response starts, so none has gone out
            await _too_large(send, path, limit)


class _TooLarge(Exception):
    pass


async def _too_large(send: Send, path: str, limit: int) -> None:
    await _reject(send, path, 413, "payload_too_large", f"request body is larger than {limit} bytes")


async def _reject(send: Send, path: str, status: int, type_: str, message: str) -> None:
    body = json.dumps(error_content(path, status, type_, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
