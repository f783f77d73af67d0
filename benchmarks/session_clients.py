"""Session-call load, run as its own process: C clients, each on its own session, calling it back to back.

    python -m benchmarks.session_clients --url http://127.0.0.1:8000 --clients 64 --seconds 15

Each client creates a session, then sends non-streaming session calls (lease, generate, commit) until
the time is up. Prints one JSON object: call latency percentiles over the measured window (after the
warm-up), calls per second, statuses. Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlparse

import aiohttp
import numpy as np


async def client(http: aiohttp.ClientSession, url: str, i: int, body: dict, window: tuple[float, float], out: dict) -> None:
    async with http.post(url + "/sessions", json={"prompt": "KING:", "seed": i}) as r:
        sid = (await r.json())["session_id"]
    while time.perf_counter() < window[1]:
        t0 = time.perf_counter()
        async with http.post(f"{url}/sessions/{sid}/generate", json=body) as r:
            await r.read()
        t1 = time.perf_counter()
        out["status"][r.status] = out["status"].get(r.status, 0) + 1
        if window[0] <= t0 and t1 <= window[1] and r.status == 200:
            out["latency"].append(t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("session_clients sends traffic to loopback addresses only")
    body = {"prompt": " ", "max_new_tokens": args.max_new_tokens}
    out = {"status": {}, "latency": []}
    start = time.perf_counter()
    window = (start + args.warmup, start + args.warmup + args.seconds)

    async def run():
        connector = aiohttp.TCPConnector(limit=0)  # one connection per client
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
            await asyncio.gather(*(client(http, args.url, i, body, window, out) for i in range(args.clients)))

    asyncio.run(run())
    lat = out["latency"]
    print(json.dumps({"clients": args.clients, "calls_per_s": len(lat) / args.seconds,
                      "p50": float(np.percentile(lat, 50)) if lat else None, "p99": float(np.percentile(lat, 99)) if lat else None,
                      "status": {str(k): v for k, v in out["status"].items()}}))


if __name__ == "__main__":
    main()
