"""Mixed traffic, run as its own process against one server: long prompts, short interactive streams and
one wide request at once (issue 24's scenario).

    python -m benchmarks.mixed_load --url http://127.0.0.1:8000 --seconds 30

- `--long` streams (8) send 20,000-character prompts back to back, each generating 32 characters;
- one wide /v1/completions request: 5 prompts x n 64 (320 choices) of 64 characters, sent once at the start;
- `--short` streams (32) start a second later and send "ROMEO: " prompts of 20 characters back to back,
  each generating 32 characters, the interactive traffic whose time to first character is the figure.

Prints one JSON object: the short requests' time to first character (p50, p99, max; requests still
waiting for one when the time is up count as waiting that long), how many short requests completed,
and the generated characters per second of all traffic over the window. Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlparse

import aiohttp
import numpy as np

from .sse import token_texts

LONG_PROMPT = ("KING HENRY:\nOnce more unto the breach, dear friends, once more;\nOr close the wall up with our English dead.\n\n" * 200)[:20_000]
SHORT_PROMPT = "ROMEO: But soft, what"  # 20 characters


async def stream(http: aiohttp.ClientSession, url: str, body: dict, out: dict, ttft: list | None) -> None:
    """One streaming /generate: count its characters, note its time to first character."""
    t0, key = time.perf_counter(), object()
    if ttft is not None:
        out["pending"][key] = t0  # a short request that has no character yet
    try:
        async with http.post(url + "/generate", json={**body, "stream": True}) as r:
            out["status"][r.status] = out["status"].get(r.status, 0) + 1
            if r.status != 200:
                await r.read()
                await asyncio.sleep(0.05)
                return
            first = True
            async for text in token_texts(r):
                now = time.perf_counter()
                if first and ttft is not None:
                    ttft.append(now - t0)
                    out["pending"].pop(key, None)
                first = False
                out["chars"].append((now, len(text)))
        if ttft is not None:
            out["short_done"] += 1
    finally:
        out["pending"].pop(key, None)


async def repeat(http, url, body, stop_at, out, ttft=None) -> None:
    while time.perf_counter() < stop_at:
        await stream(http, url, body, out, ttft)


async def wide(http: aiohttp.ClientSession, url: str, out: dict) -> None:
    body = {"model": out["model"], "prompt": [f"CHORUS {'ABCDE'[i]}:\nO for a Muse of fire\n" for i in range(5)], "n": 64,
            "max_tokens": 64, "stream": True, "seed": 1}
    async with http.post(url + "/v1/completions", json=body) as r:
        out["wide_status"] = r.status
        async for raw in r.content:
            line = raw.decode()
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    out["chars"].append((time.perf_counter(), len(choice.get("text", ""))))


async def main(url: str, seconds: float, longs: int, shorts: int) -> dict:
    assert urlparse(url).hostname in ("127.0.0.1", "localhost", "::1"), "loopback targets only"
    out = {"status": {}, "chars": [], "pending": {}, "short_done": 0, "wide_status": None}
    ttft: list[float] = []
    timeout = aiohttp.ClientTimeout(total=seconds + 120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        async with http.get(url + "/v1/models") as r:
            out["model"] = (await r.json())["data"][0]["id"]
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        tasks = [asyncio.create_task(repeat(http, url, {"prompt": LONG_PROMPT, "max_new_tokens": 32, "seed": i}, stop_at, out))
                 for i in range(longs)]
        tasks.append(asyncio.create_task(wide(http, url, out)))
        await asyncio.sleep(1.0)  # the long prompts and the wide request are in first
        tasks += [asyncio.create_task(repeat(http, url, {"prompt": SHORT_PROMPT, "max_new_tokens": 32, "seed": i},
                                             stop_at, out, ttft)) for i in range(shorts)]
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        end = time.perf_counter()
        waiting = [end - t for t in out["pending"].values()]  # short requests with no character yet
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    window = [n for t, n in out["chars"] if t0 <= t <= end]
    measured = ttft + waiting
    return {"short_ttft_p50_ms": float(np.percentile(measured, 50) * 1000) if measured else None,
            "short_ttft_p99_ms": float(np.percentile(measured, 99) * 1000) if measured else None,
            "short_ttft_max_ms": float(max(measured) * 1000) if measured else None,
            "short_completed": out["short_done"], "short_still_waiting": len(waiting),
            "chars_per_s": sum(window) / (end - t0), "status": out["status"], "wide_status": out["wide_status"]}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--long", type=int, default=8)
    p.add_argument("--short", type=int, default=32)
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a.url, a.seconds, a.long, a.short))))
