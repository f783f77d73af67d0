"""Hostile input: schemathesis over the service's own OpenAPI document, then hand-written cases.
Nothing may produce a 5xx, every error keeps the one shape, and the process stays healthy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ..server import Server
from .test_api import assert_error


@pytest.fixture(scope="module")
def fuzz_server(trained_store):
    srv = Server(trained_store, max_new_tokens=256, max_queue=1000, chat_user_speaker="KING")
    yield srv
    srv.stop()


def server_errors(srv) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("charlstm_requests_total{") and re.search(r'status="5\d\d"', line))


def test_schemathesis_finds_nothing(fuzz_server, capsys):
    cli = Path(sys.executable).parent / "schemathesis"
    config = Path(__file__).with_name("schemathesis.toml")
    out = subprocess.run([str(cli), "--config-file", str(config), "run", fuzz_server.url + "/openapi.json", "--checks", "all", "--max-examples", "50",
                          "--request-timeout", "30", "--seed", "1", "--no-color"],
                         capture_output=True, text=True, timeout=900)
    summary = out.stdout[-3000:]
    assert out.returncode == 0, summary
    cases = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert cases and cases.group(1) == cases.group(2), summary
    with capsys.disabled():
        print(f"\n[fuzz] schemathesis: {cases.group(1)} cases, all passed")
    assert server_errors(fuzz_server) == 0
    assert httpx.get(fuzz_server.url + "/ready").status_code == 200


HOSTILE = [
    # (body bytes, content type, expected status)
    (b'{"prompt": "KING", "max_new_tokens": 5', "application/json", 400),  # truncated
    (b"\xff\xfe\x00garbage", "application/json", 400),  # not UTF-8
    (b'{"prompt": "\xff\xfe"}', "application/json", 400),
    (b'{"prompt": "KING", "max_new_tokens": 1e400}', "application/json", 422),  # huge
    (b'{"max_new_tokens": 99999999999999999999999999999}', "application/json", 422),
    (b'{"temperature": Infinity}', "application/json", 422),
    (b'{"top_p": -Infinity}', "application/json", 422),
    (b'{"temperature": NaN}', "application/json", 422),
    (b'{"max_new_tokens": -1}', "application/json", 422),
    (b'{"max_new_tokens": 0.5}', "application/json", 422),
    (b'{"max_new_tokens": true}', "application/json", 422),
    (b'{"repetition_penalty": 0}', "application/json", 422),
    (b'{"top_k": -3}', "application/json", 422),
    (b'{"stream": "yes"}', "application/json", 422),
    (b'{"stop": "x"}', "application/json", 422),
    (b'{"stop": [1, 2]}', "application/json", 422),
    (b'{"prompt": null}', "application/json", 422),
    (b'{"prompt": "\\u0000\\u0007\\u001b[31m"}', "application/json", 422),  # control characters
    (b'{"prompt": "\\ud800"}', "application/json", 422),  # a lone surrogate
    (b'"just a string"', "application/json", 422),
    (b"null", "application/json", 422),
    (b"[]", "application/json", 422),
    (json.dumps({"stop": ["a"] * 5000}).encode(), "application/json", 422),  # thousands of stop strings
    (json.dumps({"stop": ["a" * 500]}).encode(), "application/json", 422),
    (json.dumps({"prompt": "KING " * 5000}).encode(), "application/json", 422),  # over max_prompt_chars
    (json.dumps({"prompt": "A", "extra": {"nested": [1] * 100}}).encode(), "application/json", 422),  # unknown field
    (b'{"prompt": "KING"}', "text/plain", 415),
    (b'{"prompt": "KING"}', "application/x-www-form-urlencoded", 415),
    (b"prompt=KING", "multipart/form-data; boundary=x", 415),
]


@pytest.mark.parametrize("body,ctype,status", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies(fuzz_server, body, ctype, status):
    for path in ("/generate", "/sessions"):
        r = httpx.post(fuzz_server.url + path, content=body, headers={"content-type": ctype}, timeout=30)
        if path == "/sessions" and body == b"null":
            assert r.status_code == 201  # the body of POST /sessions is optional: null means none
            continue
        assert_error(r, status)


def test_oversized_bodies_methods_and_paths(fuzz_server):
    url = fuzz_server.url
    assert_error(httpx.post(url + "/generate", content=b"x" * (2 << 20), headers={"content-type": "application/json"}), 413)
    for method in ("PUT", "PATCH", "DELETE"):
        r = httpx.request(method, url + "/generate")
        assert_error(r, 405)
        assert r.headers["allow"] == "POST"
    assert_error(httpx.request("PATCH", url + "/sessions/abc"), 405)
    for path in ("/sessions/../../etc/passwd", "/sessions/%2e%2e%2fx", "/sessions/" + "a" * 5000, "/%7f%00"):
        r = httpx.get(url + path)
        assert r.status_code in (404, 405) and "error" in r.json()
    assert server_errors(fuzz_server) == 0
    assert httpx.get(url + "/ready").status_code == 200


def test_streams_with_hostile_controls_always_end(fuzz_server):
    for body in ({"prompt": "", "max_new_tokens": 256, "temperature": 100, "top_k": 1_000_000, "top_p": 1e-300},
                 {"prompt": "K", "max_new_tokens": 256, "repetition_penalty": 100, "stop": ["\n", "e", "ee"]},
                 {"prompt": "", "max_new_tokens": 0, "stream": True}):
        with httpx.stream("POST", fuzz_server.url + "/generate", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            raw = r.read().decode()
        assert "event: done" in raw
    assert server_errors(fuzz_server) == 0


def test_model_references_from_settings_stay_in_the_store(trained_store):
    for ref in ("..", "tiny@../../etc", "tiny@v1/../../..", "%2e%2e", "tiny@v1@v2", "ti ny"):
        out = subprocess.run([sys.executable, "-m", "service.cli", "--store", str(trained_store), "serve", "--model", ref,
                              "--port", "0"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (ref, out.stderr)
