"""A cap on request body size, enforced before the body is parsed (pure ASGI, so streams pass untouched)."""

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
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:  # raised while the body is read, which is always before a response starts
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
