"""Bounded soak: twice the service's capacity, for a fixed time, with a mix of plain, streaming and
session requests, a share of which disconnect mid-stream. Then the books must balance.

    python -m tests.soak --seconds 60 [--store model_store --model shakespeare]

Exits non-zero when a check fails. Traffic goes to a server it starts on loopback, nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from .server import Server, wait_until


def refused(r: httpx.Response, tally: Counter) -> bool:
    """Count the status; True for a 429, which must say when to come back."""
    tally[f"status_{r.status_code}"] += 1
    if r.status_code == 429:
        assert r.headers.get("retry-after"), "429 without Retry-After"
        return True
    return False


async def worker(url: str, deadline: float, rng: random.Random, tally: Counter, sessions: list[str],
                 headers: dict | None = None) -> None:
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        while time.monotonic() < deadline:
            kind = rng.choice(["plain", "stream", "stream_drop", "session", "session_stream_drop"])
            body = {"prompt": rng.choice(["", "the ", "and "]), "max_new_tokens": rng.randint(10, 120),
                    "temperature": rng.choice([0.0, 0.8, 1.0]), "seed": rng.randrange(1 << 30)}
            path = "/generate"
            if kind.startswith("session"):
                r = await http.post(url + "/sessions", json={"prompt": "the "})
                if refused(r, tally):
                    continue
                assert r.status_code == 201, r.text
                tally["accepted"] += 1
                tally["completed"] += 1
                sid = r.json()["session_id"]
                sessions.append(sid)
                path = f"/sessions/{sid}/generate"
                body.pop("prompt")
            if kind == "plain" or kind == "session":
                r = await http.post(url + path, json=body)
                if refused(r, tally):
                    continue
                assert r.status_code == 200, r.text
                tally["accepted"] += 1
                tally["completed"] += 1
                continue
            drop_after = rng.randint(1, 8) if kind.endswith("drop") else None
            async with http.stream("POST", url + path, json={**body, "stream": True}) as r:
                if refused(r, tally):
                    await r.aread()
                    continue
                assert r.status_code == 200
                tally["accepted"] += 1
                tokens, done = 0, False
                async for line in r.aiter_lines():
                    if line.startswith("event: token"):
                        tokens += 1
                        if drop_after is not None and tokens >= drop_after:
                            break
                    elif line.startswith("event: done"):
                        done = True
                if done:
                    tally["completed"] += 1
                else:
                    tally["disconnected"] += 1  # leaving the block closes the connection mid-stream


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--store", default=None, help="model store (default: the repository's)")
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    store_root = Path(args.store or Path(__file__).resolve().parent.parent / "model_store")
    srv = Server(store_root, model=args.model, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    failures: list[str] = []
    try:
        warm = httpx.post(srv.url + "/generate", json={"max_new_tokens": 50}, timeout=60)
        assert warm.status_code == 200
        rss_before = srv.rss_mb()
        clients = 2 * (args.max_batch_size + args.max_queue)
        rng = random.Random(args.seed)
        tally: Counter = Counter()
        sessions: list[str] = []
        deadline = time.monotonic() + args.seconds
        t0 = time.monotonic()

        async def drive():
            await asyncio.gather(*(worker(srv.url, deadline, random.Random(rng.random()), tally, sessions)
                                   for _ in range(clients)))

        asyncio.run(drive())
        elapsed = time.monotonic() - t0

        wait_until(lambda: srv.metric("charlstm_running_streams") == 0 and srv.metric("charlstm_waiting_streams") == 0,
                   30, "running and waiting streams to drain")
        if httpx.get(srv.url + "/ready").status_code != 200:
            failures.append("not ready after the soak")
        busy = [s for s in sessions if httpx.get(f"{srv.url}/sessions/{s}").json().get("busy")]
        if busy:
            failures.append(f"{len(busy)} sessions still locked")
        for sid in sessions:
            httpx.delete(f"{srv.url}/sessions/{sid}")
        finished = sum(srv.metric("charlstm_streams_finished_total", f'reason="{r}"')
                       for r in ("length", "stop", "cancelled", "shutdown", "error"))
        cancelled = srv.metric("charlstm_streams_finished_total", 'reason="cancelled"')
        rejected = srv.metric("charlstm_rejected_requests_total", 'reason="overloaded"')
        errors = srv.metric("charlstm_streams_finished_total", 'reason="error"')
        server_5xx = sum(v for k, v in tally.items() if k.startswith("status_5"))
        # the warm-up request is one more finished stream than the clients saw
        if finished != tally["accepted"] + 1:
            failures.append(f"server finished {finished:.0f} streams, clients had {tally['accepted'] + 1} accepted")
        if cancelled > tally["disconnected"]:
            failures.append(f"server cancelled {cancelled:.0f} streams but clients dropped only {tally['disconnected']}")
        if rejected != tally["status_429"]:
            failures.append(f"server counted {rejected:.0f} rejections, clients saw {tally['status_429']} 429s")
        if errors or server_5xx:
            failures.append(f"{errors:.0f} engine errors, {server_5xx} 5xx responses")
        if tally["status_429"] == 0:
            failures.append("no 429 at twice the capacity: the soak did not saturate the server")
        rss_after = srv.rss_mb()
        if rss_after > rss_before + max(64.0, 0.25 * rss_before):
            failures.append(f"resident memory grew from {rss_before:.0f} MB to {rss_after:.0f} MB")
        requests = sum(v for k, v in tally.items() if k.startswith("status_"))
        print(f"[soak] {elapsed:.0f} s, {clients} clients against {args.max_batch_size} rows + {args.max_queue} queue places")
        print(f"[soak] requests {requests}, accepted {tally['accepted']}, completed {tally['completed']}, "
              f"client disconnects {tally['disconnected']} (server cancelled {cancelled:.0f}), 429s {tally['status_429']}")
        print(f"[soak] statuses {dict(sorted((k, v) for k, v in tally.items() if k.startswith('status_')))}")
        print(f"[soak] resident memory {rss_before:.0f} MB before, {rss_after:.0f} MB after; sessions created {len(sessions)}")
    finally:
        srv.stop()
    for f in failures:
        print(f"[soak] FAIL: {f}", file=sys.stderr)
    print("[soak] ok" if not failures else "[soak] failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
