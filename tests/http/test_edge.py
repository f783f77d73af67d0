"""The HTTP edge over real sockets (service/api/edge.py): oversized heads get 431, heads and bodies that
trickle in are cut off, a client that reads nothing is dropped, connections beyond the bound get 503,
and the server goes on serving through all of it."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from ..server import Server, wait_until

MAX_HEADER_BYTES = 8192
MAX_CONNECTIONS = 12


@pytest.fixture(scope="module")
def edge_server(trained_store):
    srv = Server(trained_store, max_header_bytes=MAX_HEADER_BYTES, header_timeout_s=1, body_timeout_s=1, send_timeout_s=1,
                 max_connections=MAX_CONNECTIONS, max_prompt_chars=60_000, max_body_bytes=1 << 20, max_logprob_entries=10_000_000)
    yield srv
    srv.stop()


def connect(srv: Server, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)  # a bound on a broken test, never reached when the server keeps its timeouts
    s.connect(("127.0.0.1", srv.port))
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def assert_serving(srv: Server) -> None:
    r = httpx.post(srv.url + "/generate", json={"prompt": "KING:", "max_new_tokens": 5, "seed": 1}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 1000, 8 << 20])
def test_headers_over_the_bound_get_431_in_the_error_shape(edge_server, size):
    s = connect(edge_server)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the last of 8 MiB went out
    status, body = status_and_body(read_all(s))
    assert status == 431
    assert body["error"]["type"] == "headers_too_large" and f"max_header_bytes={MAX_HEADER_BYTES}" in body["error"]["message"]
    assert httpx.get(edge_server.url + "/health", headers={"X-Fine": "a" * (MAX_HEADER_BYTES // 2)}).status_code == 200
    assert_serving(edge_server)


def test_connections_that_sent_half_a_request_line_are_closed_with_408(edge_server):
    sockets = [connect(edge_server) for _ in range(MAX_CONNECTIONS - 2)]
    for s in sockets:
        s.sendall(b"GET /hea")
    silent = connect(edge_server)  # sent nothing at all: closed without an answer
    for s in sockets:
        status, body = status_and_body(read_all(s))
        assert status == 408 and body["error"]["type"] == "request_timeout"
    assert read_all(silent) == b""
    assert_serving(edge_server)


def test_a_body_that_trickles_in_is_cut_off_and_frees_everything(edge_server):
    s = connect(edge_server)
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
    assert read_all(s) == b""  # closed by the server: the app saw the client go
    wait_until(lambda: "request body took more than" in edge_server.output(), what="the body timeout")
    assert_serving(edge_server)


def test_a_client_that_reads_nothing_of_a_large_answer_is_dropped(edge_server):
    prompt = ("KING:\nthou art my lord, and the night is sweet.\n" * 1200)[:50_000]
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 5}).encode()
    s = connect(edge_server, rcvbuf=4096)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
              + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    wait_until(lambda: "aborting a connection that read nothing" in edge_server.output(), timeout=60,
               what="the send timeout")
    raw = read_all(s)
    head, _, got = raw.partition(b"\r\n\r\n")
    declared = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    assert len(got) < declared  # the answer was cut off: the server did not keep it for a client that never reads
    assert_serving(edge_server)


def test_a_stream_to_a_client_that_reads_nothing_is_dropped_and_frees_its_row(edge_server):
    """A stream's messages go straight to the connection while it takes them; once the client stops
    reading they wait for it, and after send_timeout_s the connection is aborted and the row is freed."""
    prompt = ("KING:\nthou art my lord, and the night is sweet.\n" * 1200)[:50_000]
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4000, "echo": True, "logprobs": 5,
                       "stream": True}).encode()  # the scored prompt alone is megabytes: more than the buffers hold
    aborted = edge_server.output().count("aborting a connection that read nothing")
    s = connect(edge_server, rcvbuf=4096)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
              + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    wait_until(lambda: edge_server.output().count("aborting a connection that read nothing") > aborted, timeout=60,
               what="the send timeout")
    wait_until(lambda: edge_server.metric("charlstm_running_streams") == 0, what="the row freed")
    raw = read_all(s)
    assert raw.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in raw  # cut off: not kept for a client that never reads
    assert_serving(edge_server)


def test_a_request_beyond_max_connections_gets_503_and_never_hangs(edge_server):
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(connect(edge_server))
            idle[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # served, then held open (keep-alive)
            assert b"200 OK" in idle[-1].recv(4096)
        r = httpx.get(edge_server.url + "/info", timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded"
        assert f"max_connections={MAX_CONNECTIONS}" in r.json()["error"]["message"]
        v1 = httpx.get(edge_server.url + "/v1/models", timeout=30)
        assert v1.status_code == 503 and v1.json()["error"]["code"] == "overloaded"  # OpenAI's shape on /v1
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: httpx.get(edge_server.url + "/health", timeout=5).status_code == 200, what="a free connection")
    assert_serving(edge_server)
