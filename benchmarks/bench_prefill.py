"""Prompt ingestion over HTTP (issue 39) against the bare int8 step loop, side by side in one run.

    python -m benchmarks.bench_prefill [--baseline DIR] [--rounds 1] [--backend auto]

1. The peer: ONNX Runtime's own loop over the onnx-int8 step graph, one thread, B = 1 (bench_cost's raw
   loop), measured before and after the servers; and the backend's block (`Backend.ingest`) of 1 and of
   8 rows x `prefill_chunk` characters, and a lone prompt's block: the work a loop may add in front of
   a decode step.
2. Each server (this tree; with --baseline another checkout too, in alternate rounds), default settings,
   driven by this module's own client in a process of its own (`--drive URL`):
   - alone: one 20,000-character prompt, `max_new_tokens` 1: prompt characters per second;
   - eight: 8 such prompts at once: prompt characters per second, all together;
   - meanwhile: 4 streams decode (SSE) while 8 such prompts ingest; the gaps between their events while
     the prompts ingest (p50, p99, max), and short streaming requests of 20 characters sent one after
     another (at most 10) meanwhile: each one's time to its first character (p50, max).
Loopback only; every request count and duration is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from service.model import store
from service.backends.base import set_kernel_threads
from service.backends.selector import build
from service.engine.scheduler import Scheduler

from .bench_backends import cpu_name
from .bench_cost import raw_onnx_loop
from .common import ROOT, run_json, table, tree_server
from .sse import token_texts

LONG = ("KING HENRY:\nOnce more unto the breach, dear friends, once more;\nOr close the wall up with our English dead.\n\n"
        * 200)[:20_000]
SHORT = "ROMEO: But soft, what"[:20]
DECODERS, LONGS, SHORTS = 4, 8, 10


# ---------------------------------------------------------------------- the client (its own process)

async def _generate(http, url: str, prompt: str, seed: int) -> None:
    async with http.post(url + "/generate", json={"prompt": prompt, "max_new_tokens": 1, "seed": seed}) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {body[:300]!r}")


async def _stream(http, url: str, body: dict, on_event) -> None:
    """A streaming /generate; on_event(time) at each token event."""
    async with http.post(url + "/generate", json={**body, "stream": True}) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {(await r.read())[:300]!r}")
        async for _ in token_texts(r):
            on_event(time.perf_counter())


async def _ingest(http, url: str, n: int) -> float:
    """n long prompts at once: their prompt characters per second, all together."""
    t0 = time.perf_counter()
    await asyncio.gather(*(_generate(http, url, LONG, i) for i in range(n)))
    return n * len(LONG) / (time.perf_counter() - t0)


async def _meanwhile(http, url: str) -> dict:
    """4 decoding streams and short requests while 8 long prompts ingest."""
    events: list[list[float]] = [[] for _ in range(DECODERS)]
    started = asyncio.Event()

    def noter(i):
        def note(t):
            events[i].append(t)
            if all(events):
                started.set()
        return note

    decoders = [asyncio.create_task(_stream(http, url, {"prompt": "KING:\n", "max_new_tokens": 100_000 // 25, "seed": 50 + i},
                                            noter(i))) for i in range(DECODERS)]
    await asyncio.wait_for(started.wait(), 60)
    t0 = time.perf_counter()
    longs = asyncio.create_task(_ingest(http, url, LONGS))
    ttft = []
    for i in range(SHORTS):
        if longs.done():
            break
        first: list[float] = []
        t = time.perf_counter()
        await _stream(http, url, {"prompt": SHORT, "max_new_tokens": 20, "seed": i}, first.append)
        ttft.append(first[0] - t)
    rate = await longs
    t1 = time.perf_counter()
    for task in decoders:
        task.cancel()
    await asyncio.gather(*decoders, return_exceptions=True)
    gaps = [b - a for times in events for a, b in zip(times, times[1:]) if a >= t0 and b <= t1]
    return {"decode_gap_p50_ms": float(np.percentile(gaps, 50) * 1000), "decode_gap_p99_ms": float(np.percentile(gaps, 99) * 1000),
            "decode_gap_max_ms": max(gaps) * 1000, "short_ttft_p50_ms": statistics.median(ttft) * 1000,
            "short_ttft_max_ms": max(ttft) * 1000, "shorts": len(ttft), "eight_meanwhile_chars_per_s": rate}


async def drive(url: str) -> dict:
    import aiohttp

    assert urlparse(url).hostname in ("127.0.0.1", "localhost", "::1"), "loopback targets only"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900), connector=aiohttp.TCPConnector(limit=0)) as http:
        await _generate(http, url, LONG[:2000], 0)  # warm-up
        alone = await _ingest(http, url, 1)
        eight = await _ingest(http, url, LONGS)
        return {"alone_chars_per_s": alone, "eight_chars_per_s": eight, **await _meanwhile(http, url)}


# ---------------------------------------------------------------------- the runner

def peer(model: str, seconds: float) -> float:
    """ONNX Runtime's own int8 step loop, B = 1, one thread: chars/s."""
    backend = build("onnx-int8", store.load(model), workers=1)
    try:
        return statistics.median(raw_onnx_loop(backend, 1, seconds) for _ in range(3))
    finally:
        backend.close()


def block_times(model: str, backend_name: str, chunk: int, rows: int) -> list[list]:
    """ms of one block (`Backend.ingest`) of 1 and of `rows` rows x `chunk` characters, and of the block
    a lone prompt gets (the chunks the scheduler gives a row of a block of 1), best of 5; the backend's
    own estimate beside each."""
    backend = build(backend_name, store.load(model), workers=1)
    lone = Scheduler(rows, rows, chunk, rows, backend.block_seconds).chunks_a_row(1) * chunk
    out = []
    try:
        for r, chars in ((1, chunk), (rows, chunk), (1, lone)):
            slices = [[(7 * i + r) % backend.vocab_size for i in range(chars)] for r in range(r)]
            state = backend.zero_state(r)
            backend.ingest(slices, state)
            best = min(_timed(lambda: backend.ingest(slices, state)) for _ in range(5))
            estimate = backend.block_seconds(r, chars)
            out.append([f"{r} x {chars}", best * 1000, r * chars / best, "-" if estimate is None else estimate * 1000])
    finally:
        backend.close()
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


FIGURES = [("alone_chars_per_s", "one 20,000-char prompt alone: chars/s"), ("eight_chars_per_s", "8 at once: chars/s, all"),
           ("decode_gap_p50_ms", "decode gap p50 while 8 ingest (ms)"), ("decode_gap_p99_ms", "decode gap p99 (ms)"),
           ("decode_gap_max_ms", "decode gap max (ms)"), ("short_ttft_p50_ms", "short request first char p50 (ms)"),
           ("short_ttft_max_ms", "short request first char, worst (ms)"), ("shorts", "short requests sent meanwhile")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--baseline", type=Path, help="another checkout of the project (the build before)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--peer-seconds", type=float, default=2.0)
    a = ap.parse_args()
    if a.drive:
        print(json.dumps(asyncio.run(drive(a.drive))))
        return
    set_kernel_threads(1)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; model {a.model}; server backend {a.backend}")
    before = peer(a.model, a.peer_seconds)
    from service.settings import Settings
    settings = Settings(_env_file=None)
    blocks = block_times(a.model, "onnx-int8", settings.prefill_chunk, settings.prefill_rows)
    trees = {"this tree": ROOT, **({"baseline": a.baseline.resolve()} if a.baseline else {})}
    servers = {name: tree_server(tree, a.backend) for name, tree in trees.items()}
    got: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for _ in range(a.rounds):
            for name, proc in servers.items():
                got[name].append(run_json(["-m", "benchmarks.bench_prefill", "--drive", proc.url], timeout=1800))
    finally:
        for proc in servers.values():
            proc.stop()
    after = peer(a.model, a.peer_seconds)
    bare = (before + after) / 2
    print(f"\npeer: ONNX Runtime's int8 step loop, B = 1, one thread: {before:,.0f} chars/s before the servers, {after:,.0f} after "
          f"(mean {bare:,.0f})")
    print("\nonnx-int8 blocks (Backend.ingest): what a loop adds in front of a decode step at most; the last, a lone prompt's")
    print(table(["block (rows x chars)", "ms", "chars/s", "the backend's estimate (ms)"], blocks))
    rows = []
    for key, label in FIGURES:
        rows.append([label, *(statistics.median(r[key] for r in got[name]) for name in trees)])
    for key, label in (("alone_chars_per_s", "alone / peer B = 1"), ("eight_chars_per_s", "8 at once / peer B = 1")):
        rows.append([label, *(statistics.median(r[key] for r in got[name]) / bare for name in trees)])
    print(f"\nover HTTP, median of {a.rounds} round(s), rounds alternate between the servers")
    print(table(["figure", *trees], rows))


if __name__ == "__main__":
    main()
