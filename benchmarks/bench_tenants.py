"""Fairness between clients (issue 40): one client's flood against another's interactive requests, and
two clients' shares, on this tree and another checkout side by side.

    python -m benchmarks.bench_tenants [--baseline DIR] [--rounds 1] [--seconds 15]

Each server runs with default settings (the bundled model, `--backend auto`); clients are told apart by
their loopback source address (127.0.0.2, 127.0.0.3, ...), which the server sees as the client's address.
The client load runs in a process of its own (`--drive URL`), in alternate rounds between the servers:

1. flood: client A (a process of its own) keeps 400 streaming requests of 300 characters in flight for
   25 s (a 429 is retried after its Retry-After); after 4 s, client B sends 10 streaming requests of 20
   characters, one after another. B's time to its first character (p50, p99, worst), B's refusals, and
   A's statuses.
2. shares: clients C and D each keep 32 streaming requests in flight for `--seconds`, C asking 64
   characters a request and D 256: each one's characters per second, and their ratio.
With `--replicas N`, N replicas of this tree behind a local nginx (round robin, the client's address
forwarded as docker/nginx.scale.conf forwards it) take the same load. Loopback only; bounded request
counts and durations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .bench_backends import cpu_name
from .common import ROOT, Proc, run_json, table, tree_server
from .sse import token_texts

FLOOD, FLOOD_CHARS, SHORTS, SHORT_CHARS = 400, 300, 10, 20
FLOOD_S, FLOOD_WARMUP_S = 25.0, 4.0  # A floods this long; B starts after the warm-up


async def _stream(http, url: str, body: dict, first=None, chars=None) -> int:
    """One streaming /generate: its status; first(t) at its first character, chars(n) at each event."""
    t0 = time.perf_counter()
    async with http.post(url + "/generate", json={**body, "stream": True}) as r:
        if r.status != 200:
            await r.read()
            return r.status
        async for text in token_texts(r):
            if first is not None:
                first(time.perf_counter() - t0)
                first = None
            if chars is not None:
                chars(len(text))
        return 200


def _session(address: str):
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                 connector=aiohttp.TCPConnector(limit=0, local_addr=(address, 0)))


async def flood_a(url: str, seconds: float) -> dict:
    """Client A: FLOOD streaming requests in flight for `seconds`; a 429 waits its Retry-After, as client
    libraries do (the openai client among them)."""
    statuses: dict[int, int] = {}
    stop_at = time.perf_counter() + seconds

    async def keep(http, i):
        while time.perf_counter() < stop_at:
            status = await _stream(http, url, {"prompt": "KING:\n", "max_new_tokens": FLOOD_CHARS, "seed": i})
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                await asyncio.sleep(1.0)  # Retry-After: 1

    async with _session("127.0.0.2") as a:
        await asyncio.gather(*(keep(a, i) for i in range(FLOOD)))
    return statuses


async def client_b(url: str) -> dict:
    """Client B, in a process of its own (A's 400 streams would slow a shared client's own loop): 10
    short streaming requests one after another, while A floods."""
    ttft, statuses = [], {}
    async with _session("127.0.0.3") as b:
        for i in range(SHORTS):
            first = []
            status = await _stream(b, url, {"prompt": "ROMEO: But soft, what"[:20], "max_new_tokens": SHORT_CHARS, "seed": i},
                                   first.append)
            statuses[status] = statuses.get(status, 0) + 1
            if first:
                ttft.append(first[0])
    return {"b_ttft_p50_ms": statistics.median(ttft) * 1000 if ttft else None,
            "b_ttft_p99_ms": float(np.percentile(ttft, 99) * 1000) if ttft else None,
            "b_ttft_max_ms": max(ttft) * 1000 if ttft else None, "b_refused": sum(n for s, n in statuses.items() if s != 200),
            "b_ttfts_ms": [round(t * 1000) for t in ttft]}


def flood(url: str) -> dict:
    """A's flood in its own process; after a warm-up, B's requests from this one."""
    a = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_tenants", "--flood", url], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        time.sleep(FLOOD_WARMUP_S)  # the flood fills the rows and the queue first: a benchmark's warm-up
        b = asyncio.run(client_b(url))
        out, _ = a.communicate(timeout=FLOOD_S + 120)
    finally:
        a.kill()
    return {**b, "a_statuses": json.loads(out.strip().splitlines()[-1])}


async def shares(url: str, seconds: float) -> dict:
    got = {"C": 0, "D": 0}
    stop_at = time.perf_counter() + seconds + 2

    async def keep(http, who, n, i):
        def count(k):
            if t0 <= time.perf_counter() <= stop_at:
                got[who] += k
        while time.perf_counter() < stop_at:
            await _stream(http, url, {"prompt": "KING:\n", "max_new_tokens": n, "seed": i}, chars=count)

    t0 = time.perf_counter() + 2  # 2 s warm-up
    async with _session("127.0.0.4") as c, _session("127.0.0.5") as d:
        tasks = [asyncio.create_task(keep(c, "C", 64, i)) for i in range(32)]
        tasks += [asyncio.create_task(keep(d, "D", 256, i)) for i in range(32)]
        await asyncio.gather(*tasks)
    c_rate, d_rate = got["C"] / seconds, got["D"] / seconds
    return {"c_chars_per_s": c_rate, "d_chars_per_s": d_rate, "c_over_d": c_rate / d_rate if d_rate else None}


def drive(url: str, seconds: float) -> dict:
    assert urlparse(url).hostname in ("127.0.0.1", "localhost"), "loopback targets only"
    return {**flood(url), **asyncio.run(shares(url, seconds))}


NGINX_CONF = """worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    upstream charlstm {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://charlstm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;  # as docker/nginx.scale.conf: the client's address
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


def nginx(upstreams: list[str]) -> Proc:
    """The system's nginx in front of the replicas, round robin, as in docker/nginx.scale.conf."""
    import shutil

    from tests.server import free_port

    root, port = Path(tempfile.mkdtemp(prefix="charlstm-nginx-")), free_port()
    servers = "\n".join(f"        server {urlparse(u).netloc};" for u in upstreams)
    (root / "nginx.conf").write_text(NGINX_CONF.format(root=root, servers=servers, port=port))
    return Proc(["-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"], probe="/health", timeout=30,
                program=shutil.which("nginx") or "/usr/sbin/nginx", port=port)


FIGURES = [("b_ttft_p50_ms", "B's first character p50 (ms) while A floods"), ("b_ttft_p99_ms", "B's first character p99 (ms)"),
           ("b_ttft_max_ms", "B's first character, worst (ms)"), ("b_refused", "B's requests refused (of 10)"),
           ("c_chars_per_s", "C, 32 streams of 64 chars: chars/s"), ("d_chars_per_s", "D, 32 streams of 256 chars: chars/s"),
           ("c_over_d", "C / D")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    ap.add_argument("--flood", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", type=Path, help="another checkout of the project (the build before)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--replicas", type=int, default=1, help="this tree's replicas behind a local nginx (needs nginx); "
                    "with more than one, no baseline")
    a = ap.parse_args()
    if a.flood:
        assert urlparse(a.flood).hostname in ("127.0.0.1", "localhost"), "loopback targets only"
        print(json.dumps(asyncio.run(flood_a(a.flood, FLOOD_S))))
        return
    if a.drive:
        print(json.dumps(drive(a.drive, a.seconds)))
        return
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; the bundled model, default settings")
    trees = {"this tree": ROOT, **({"baseline": a.baseline.resolve()} if a.baseline else {})}
    if a.replicas > 1:
        trees = {f"{a.replicas} replicas behind nginx": ROOT}
        replicas = [tree_server(ROOT, CHARLSTM_MAX_CONNECTIONS="2048") for _ in range(a.replicas)]
        servers = {next(iter(trees)): nginx([r.url for r in replicas])}
    else:
        replicas, servers = [], {name: tree_server(tree, CHARLSTM_MAX_CONNECTIONS="2048") for name, tree in trees.items()}
    got: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for _ in range(a.rounds):
            for name, proc in servers.items():
                got[name].append(run_json(["-m", "benchmarks.bench_tenants", "--drive", proc.url, "--seconds", str(a.seconds)],
                                          timeout=1800))
    finally:
        for proc in [*servers.values(), *replicas]:
            proc.stop()
    rows = [[label, *(statistics.median(r[key] for r in got[name] if r[key] is not None) if any(r[key] is not None for r in got[name])
                      else "-" for name in trees)] for key, label in FIGURES]
    print(f"\nmedian of {a.rounds} round(s), rounds alternate between the servers")
    print(table(["figure", *trees], rows))
    for name in trees:
        print(f"{name}: A's statuses {[r['a_statuses'] for r in got[name]]}; B's first characters (ms) "
              f"{[r['b_ttfts_ms'] for r in got[name]]}")


if __name__ == "__main__":
    main()
