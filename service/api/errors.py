"""One error shape for every failure: {"error": {"type", "message", "param"}}; on the OpenAI routes
(/v1) OpenAI's own, {"error": {"message", "type", "param", "code"}}, so its clients raise their typed
exceptions. `error_content` picks the shape by path, for the handlers here and the ASGI middleware."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..engine.types import EngineError
from .openai import errors as openai_errors

log = logging.getLogger("charlstm.api")

ENGINE_STATUS = {"overloaded": 429, "shutting_down": 503, "session_not_found": 404, "session_busy": 409,
                 "too_many_sessions": 429, "engine_error": 503, "session_store_unavailable": 503,
                 "invalid_session_blob": 422, "session_blob_expired": 422, "model_mismatch": 409, "unsupported": 400,
                 "model_not_found": 404, "too_many_models": 503, "model_load_failed": 500}
HTTP_TYPES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_field",
              429: "overloaded", 503: "not_ready"}


class APIError(Exception):
    def __init__(self, status: int, type_: str, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.param, self.headers = status, type_, message, param, headers


def error_body(type_: str, message: str, param: str | None = None) -> dict:
    return {"error": {"type": type_, "message": message, "param": param}}


def error_content(path: str, status: int, type_: str, message: str, param: str | None = None) -> dict:
    """The error body for a request to `path`: OpenAI's shape on /v1 (the native type becomes its `code`)."""
    if openai_errors.is_v1(path):
        return openai_errors.error_body(status, type_, message, param)
    return error_body(type_, message, param)


def error_response(status: int, type_: str, message: str, param: str | None = None, headers: dict | None = None,
                   path: str = "") -> JSONResponse:
    return JSONResponse(error_content(path, status, type_, message, param), status_code=status, headers=headers)


def from_engine(exc: EngineError) -> APIError:
    status = ENGINE_STATUS.get(exc.type, 500)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return APIError(status, exc.type, str(exc), getattr(exc, "param", None), headers)


def _validation_message(err: dict) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    ctx = err.get("ctx") or {}
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif ctx and not any(str(v) in msg for v in ctx.values() if not isinstance(v, Exception)):
        msg = f"{msg} ({', '.join(f'{k}={v}' for k, v in ctx.items() if not isinstance(v, Exception))})"
    return (f"{param}: {msg}" if param else msg), param


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this path (one path can be split over several routes),
    found by asking the router itself. A path the OpenAPI document lists as it is (/sessions/import)
    has the methods listed there, though a templated route (/sessions/{session_id}) matches it too."""
    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    literal = app.openapi().get("paths", {}).get(request.url.path)
    if literal:
        return [m for m in methods if m.lower() in literal]
    allowed = []
    for method in methods:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.type, exc.message, exc.param, exc.headers, request.url.path)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        e = from_engine(exc)
        return error_response(e.status, e.type, e.message, e.param, e.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        path = request.url.path
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "malformed JSON")
            return error_response(400, "invalid_json", f"request body is not valid JSON: {detail}", path=path)
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            return error_response(400, "invalid_json", "request body is missing: send a JSON object", path=path)
        message, param = _validation_message(first)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        if openai_errors.is_v1(path):  # OpenAI answers every malformed request with 400
            code = "unknown_field" if first.get("type") == "extra_forbidden" else "invalid_field"
            return error_response(400, code, message, param, path=path)
        return error_response(422, "invalid_field", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = HTTP_TYPES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else type_
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            allowed = _allowed_methods(app, request)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed here; use {' or '.join(allowed)}"
        return error_response(exc.status_code, type_, message, None, headers or None, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the server hit an unexpected error; it has been logged",
                              path=request.url.path)
