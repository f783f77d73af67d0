"""Load generator, run as its own process: B concurrent streaming clients against one URL.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --clients 64 --seconds 20 --max-new-tokens 256

Each client sends streaming /generate requests back to back until the time is up (a request under way
then finishes). Prints one JSON object: generated characters per second over the measured window,
time to first token and inter-token latency percentiles, statuses. Loopback targets only.
With --plain the requests are not streamed: each answer's characters count as spread evenly over its
request's time, and request latency percentiles replace the token ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from urllib.parse import urlparse

import aiohttp
import numpy as np

from .sse import token_texts


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
            last = None
            async for text in token_texts(r):
                now, n = time.perf_counter(), len(text)
                if last is None:
                    out["ttft"].append(now - t0)
                else:
                    out["itl"].extend([(now - last) / n] * n)
                last = now
                out["chars"].append((now, n))


async def plain_client(http: aiohttp.ClientSession, url: str, body: dict, stop_at: float, out: dict) -> None:
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        async with http.post(url + "/generate", json=body) as r:
            out["status"][r.status] = out["status"].get(r.status, 0) + 1
            answer = await r.json(content_type=None)
        if r.status != 200:
            await asyncio.sleep(min(float(r.headers.get("retry-after", "0.05")), 0.05))
            continue
        t1 = time.perf_counter()
        out["latency"].append(t1 - t0)
        out["spans"].append((t0, t1, len(answer["text"])))


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
    ap.add_argument("--plain", action="store_true", help="whole answers instead of SSE streams")
    ap.add_argument("--prompt", default="\n", help="every request's prompt")
    ap.add_argument("--model", default=None, help="the model every request names (default: the server's default)")
    ap.add_argument("--first-seed", type=int, default=0, help="client i sends seed first_seed + i (several processes: distinct seeds)")
    ap.add_argument("--cpu-pid", type=int, default=None, help="also report the CPU seconds this process (the server: all its "
                    "threads and the processes it started) spent within the measured window, read from /proc")
    args = ap.parse_args()
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen sends traffic to loopback addresses only")
    body = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "stream": not args.plain}
    if args.model:
        body["model"] = args.model
    out = {"status": {}, "ttft": [], "itl": [], "chars": [], "latency": [], "spans": []}
    one = plain_client if args.plain else client
    start = time.perf_counter()
    stop_at = start + args.warmup + args.seconds

    cpu: list[float] = []  # the server's CPU seconds at the window's start and end

    async def read_cpu():
        for at in (start + args.warmup, stop_at):
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            cpu.append(tree_cpu_seconds(args.cpu_pid))

    async def run():
        # One connection per client, as separate users would have; aiohttp parses HTTP in C, which leaves
        # more of the two cores to the server than a pure-Python client would.
        limits = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=600)) as http:
            await asyncio.gather(*(one(http, args.url, {**body, "seed": args.first_seed + i}, stop_at, out)
                                   for i in range(args.clients)), *([read_cpu()] if args.cpu_pid else []))

    asyncio.run(run())
    lo, hi = start + args.warmup, stop_at
    window = sum(n for t, n in out["chars"] if lo <= t <= hi)
    events = sum(1 for t, n in out["chars"] if lo <= t <= hi)  # SSE messages with text, in the window
    window += sum(n * max(0.0, min(t1, hi) - max(t0, lo)) / (t1 - t0) for t0, t1, n in out["spans"] if t1 > t0)
    total = sum(v for v in out["status"].values())
    print(json.dumps({
        "clients": args.clients, "chars_per_s": window / (hi - lo),
        "ttft_p50": pct(out["ttft"], 50), "ttft_p99": pct(out["ttft"], 99),
        "itl_p50": pct(out["itl"], 50), "itl_p99": pct(out["itl"], 99),
        "latency_p50": pct(out["latency"], 50), "latency_p99": pct(out["latency"], 99),
        "requests": total, "status": {str(k): v for k, v in out["status"].items()},
        "share_429": out["status"].get(429, 0) / total if total else 0.0,
        "server_cpu_s": cpu[1] - cpu[0] if len(cpu) == 2 else None, "window_chars": window,
        "window_events": events,
    }))


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds so far of a process, all its threads and every process it started that is still running
    (a server whose engine runs in a child process is all of that)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            todo += [int(c) for task in os.listdir(f"/proc/{p}/task")
                     for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            continue  # ended meanwhile
    return total


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds so far of a process and all its threads (/proc/PID/stat), or of one of
    its threads (/proc/PID/task/TID/stat): fields 14 and 15."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
