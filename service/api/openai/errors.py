"""OpenAI's error shape and which paths speak it: imported by the HTTP layer's error handling (api/errors.py),
which must not import the request models (they reach validate.py, which raises its errors)."""

from __future__ import annotations

from pydantic import BaseModel, Field

V1_PREFIX = "/v1"


def is_v1(path: str) -> bool:
    return path == V1_PREFIX or path.startswith(V1_PREFIX + "/")


# ---------------------------------------------------------------- errors
# OpenAI's `type` for each status; the native error type goes into `code`, the finer reason.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    """{"error": {"message", "type", "param", "code"}}: what the `openai` client turns into its typed exceptions."""
    type_ = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: str | None
    code: str | None = Field(description="this server's finer reason: unknown_field, model_not_found, session_busy, ...")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
