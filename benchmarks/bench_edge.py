"""The HTTP edge under slow and oversized clients: the server's memory with 1,000 slow connections open,
whether it serves meanwhile, and whether the header timeout closes them.

    python -m benchmarks.bench_edge [--connections 1000] [--baseline /path/to/other/checkout]

Each slow connection sends half a request line ("GET /hea") and nothing more. Then ten connections each
send 16 MiB of one header without ending it. The figures: resident memory before, with the slow
connections open, after the oversized heads, and how many slow connections the server had closed once
its header timeout passed (header_timeout_s, 10 s by default). Loopback only; bounded counts and time.
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

import httpx

from tests.server import rss_mb

from .bench_ab import build
from .common import ROOT, table


def open_slow(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /hea")
        out.append(s)
    return out


def closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        data = s.recv(4096)
        return data == b"" or data.startswith(b"HTTP/1.1 408")
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def huge_heads(port: int, n: int, size: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size)
        except OSError:
            pass  # the server answered 431 and closed while the header was still going out
        out.append(s)
    return out


def measure(name: str, root: Path, connections: int, wait_s: float) -> list:
    server = build(root, "shakespeare", 1, "none")
    pid = server.proc.pid
    try:
        before = rss_mb(pid)
        slow = open_slow(server.port, connections)
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/generate", json={"prompt": "KING:", "max_new_tokens": 20, "seed": 1}, timeout=60)
        served_ms = (time.perf_counter() - t0) * 1000 if r.status_code == 200 else float("nan")
        with_slow = rss_mb(pid)
        heads = huge_heads(server.port, 10, 16 << 20)
        with_heads = rss_mb(pid)
        time.sleep(wait_s)  # a benchmark waits out the server's header timeout, then looks
        closed = sum(closed_by_server(s) for s in slow)
        for s in slow + heads:
            s.close()
        return [name, before, with_slow, with_heads, served_ms, f"{closed} of {connections}"]
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--wait", type=float, default=12.0, help="seconds to wait for the header timeout (10 s by default)")
    p.add_argument("--baseline", type=Path, help="another checkout, measured the same way")
    a = p.parse_args()
    rows = [measure("this tree", ROOT, a.connections, a.wait)]
    if a.baseline:
        rows.insert(0, measure("baseline", a.baseline.resolve(), a.connections, a.wait))
    print(table(["build", "RSS before (MB)", f"with {a.connections} slow (MB)", "+ 10 x 16 MiB heads (MB)",
                 "a /generate meanwhile (ms)", f"slow ones closed after {a.wait:g} s"], rows))


if __name__ == "__main__":
    main()
