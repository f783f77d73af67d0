"""Who may talk to the server: optional API keys, the single `api_key` or named ones (`identity.py`;
`Authorization: Bearer <key>` on every route but the probes and the playground's static files, and
/metrics whenever a key is set unless configured), and
optional trusted hosts (other Host headers get 400). Pure ASGI, so a refused request costs no body parsing."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_content
from .identity import Keys

# The probes, and the playground page with its assets (the page asks for the key and sends it itself).
OPEN_PATHS = frozenset({"/health", "/ready", "/", "/playground/app.js", "/playground/style.css"})


class APIKeyAuth:
    """Checks the key, and leaves the key it matched in the request's state (`identity.client_of`)."""

    def __init__(self, app: ASGIApp, keys: Callable[[], Keys], protect_metrics: Callable[[], bool]):
        self.app, self.keys, self.protect_metrics = app, keys, protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keys() if scope["type"] == "http" else None
        path = scope.get("path", "")
        if not keys or path in OPEN_PATHS or (path == "/metrics" and not self.protect_metrics()):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
        scheme, _, token = given.partition(b" ")
        key = keys.match(token.strip()) if scheme.lower() == b"bearer" else None
        if key is not None:
            scope.setdefault("state", {})["api_key"] = key
            return await self.app(scope, receive, send)
        body = json.dumps(error_content(path, 401, "unauthorized", "missing or wrong API key: send Authorization: Bearer <key>")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="charlstm"')]})
        await send({"type": "http.response.body", "body": body})


# the orchestrator probes and the scraper reach a replica by its address, whatever the trusted names
# (/metrics keeps the API key's protection)
ANY_HOST = frozenset({"/health", "/ready", "/metrics"})


class TrustedHosts:
    """With `trusted_hosts` set, a request whose Host header matches none of them (shell-style patterns,
    port ignored) gets 400 invalid_host: a DNS-rebinding page or a stray name cannot reach the API."""

    def __init__(self, app: ASGIApp, hosts: Callable[[], list[str] | None]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = self.hosts() if scope["type"] in ("http", "websocket") else None
        if not allowed or scope.get("path", "") in ANY_HOST:
            return await self.app(scope, receive, send)
        host = next((value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"host"), "")  # the first, as Starlette reads it
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # drop the port, keep an IPv6 literal
        if any(fnmatch.fnmatchcase(name.lower(), pattern.lower()) for pattern in allowed):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        body = json.dumps(error_content(path, 400, "invalid_host", f"this server does not answer for the host {name!r}")).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
