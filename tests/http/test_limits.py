"""The body-size limit over real HTTP: 413 however the body is framed, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

LIMIT = 4096  # small_server's max_body_bytes


def _chunked(body: bytes, size: int = 1024):
    """The body in pieces with no Content-Length: httpx frames a generator with chunked encoding."""
    for i in range(0, len(body), size):
        yield body[i:i + size]


def _post_chunked(url: str, body: dict) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        request = client.build_request("POST", url, content=_chunked(json.dumps(body).encode()),
                                       headers={"content-type": "application/json"})
        assert request.headers.get("transfer-encoding") == "chunked" and "content-length" not in request.headers
        return client.send(request)


@pytest.mark.parametrize("path", ["/generate", "/sessions"])
def test_a_chunked_body_over_the_limit_gets_413_in_the_error_shape(small_server, path):
    response = _post_chunked(small_server.url + path, {"prompt": "a" * (4 * LIMIT)})
    assert response.status_code == 413, response.text
    assert response.json() == {"error": {"type": "payload_too_large", "param": None,
                                         "message": f"request body is larger than {LIMIT} bytes"}}


def test_a_chunked_body_under_the_limit_is_served(small_server):
    response = _post_chunked(small_server.url + "/generate", {"prompt": "KING:", "max_new_tokens": 5, "seed": 1})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5
