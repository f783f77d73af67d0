"""Load generator, run as its own process: B concurrent streaming clients against one URL.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --clients 64 --seconds 20 --max-new-tokens 256

Each client sends streaming /generate requests back to back until the time is up (a request under way
then finishes). Prints one JSON object: generated characters per second over the measured window,
time to first token and inter-token latency percentiles, statuses. Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlparse

import aiohttp
import numpy as np


async def client(http: aiohttp.ClientSession, url: str, body: dict, stop_at: float, out: dict) -> None:
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        async with http.post(url + "/generate", json=body, headers={"accept": "text/event-stream"}) as r:
            out["status"][r.status] = out["status"].get(r.status, 0) + 1
            if r.status != 200:
                await r.read()
                retry = float(r.headers.get("retry-after", "0.05"))
                await asyncio.sleep(min(retry, 0.05))  # back off as told, briefly
                continue
            last, event = None, None
            async for raw in r.content:  # one SSE line at a time
                line = raw.decode()
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "token":
                    now = time.perf_counter()
                    n = len(json.loads(line[5:])["text"])
                    if last is None:
                        out["ttft"].append(now - t0)
                    else:
                        out["itl"].extend([(now - last) / n] * n)
                    last = now
                    out["chars"].append((now, n))


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds excluded from the throughput window")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen sends traffic to loopback addresses only")
    body = {"prompt": "\n", "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "stream": True}
    out = {"status": {}, "ttft": [], "itl": [], "chars": []}
    start = time.perf_counter()
    stop_at = start + args.warmup + args.seconds

    async def run():
        # One connection per client, as separate users would have; aiohttp parses HTTP in C, which leaves
        # more of the two cores to the server than a pure-Python client would.
        limits = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=600)) as http:
            await asyncio.gather(*(client(http, args.url, {**body, "seed": i}, stop_at, out) for i in range(args.clients)))

    asyncio.run(run())
    lo, hi = start + args.warmup, stop_at
    window = sum(n for t, n in out["chars"] if lo <= t <= hi)
    total = sum(v for v in out["status"].values())
    print(json.dumps({
        "clients": args.clients, "chars_per_s": window / (hi - lo),
        "ttft_p50": pct(out["ttft"], 50), "ttft_p99": pct(out["ttft"], 99),
        "itl_p50": pct(out["itl"], 50), "itl_p99": pct(out["itl"], 99),
        "requests": total, "status": {str(k): v for k, v in out["status"].items()},
        "share_429": out["status"].get(429, 0) / total if total else 0.0,
    }))


if __name__ == "__main__":
    main()
