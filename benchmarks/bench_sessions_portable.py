"""Portable sessions on the bundled model: the blob's size, and export/import latency under concurrency.

    python -m benchmarks.bench_sessions_portable [--model shakespeare] [--concurrency 64] [--rounds 20]

One server (one torch thread, no session database) holds `concurrency` primed sessions. Each round
fires `concurrency` calls at once and waits for all of them; a call's latency is from its send to
its whole answer. Side by side, in the same server: GET /sessions/{id} (a store read without the
blob) as the baseline, then export, import (decode, checks, a new record) and fork. Figures are
printed; nothing is asserted. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import time
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks.common import charlstm_server, table


async def timed(http: aiohttp.ClientSession, method: str, url: str, want: int, **kwargs) -> tuple[float, dict]:
    t0 = time.perf_counter()
    async with http.request(method, url, **kwargs) as r:
        body = await r.json()
        if r.status != want:
            raise RuntimeError(f"{method} {url}: {r.status} {body}")
    return time.perf_counter() - t0, body


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used: what a call costs the server, whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def rounds(http, calls, n_rounds: int, pid: int) -> tuple[list[float], list[dict], float]:
    """`calls`: one coroutine factory per concurrent client; every round runs them all at once.
    Returns each call's latency, the last round's bodies and the server's CPU seconds per call."""
    seconds, bodies = [], []
    cpu0 = cpu_seconds(pid)
    for _ in range(n_rounds):
        results = await asyncio.gather(*(call() for call in calls))
        seconds += [s for s, _ in results]
        bodies = [b for _, b in results]
    return seconds, bodies, (cpu_seconds(pid) - cpu0) / len(seconds)


async def run(url: str, pid: int, concurrency: int, n_rounds: int) -> None:
    limits = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=limits) as http:
        info = await (await http.get(url + "/info")).json()
        sids = []
        for i in range(concurrency):
            _, s = await timed(http, "POST", url + "/sessions", 201, json={"prompt": "ROMEO:\n", "seed": i})
            sids.append(s["session_id"])
        # warm every path once
        _, warm = await timed(http, "GET", f"{url}/sessions/{sids[0]}/export", 200)
        await timed(http, "POST", url + "/sessions/import", 201, json=warm)

        def get(sid):
            return lambda: timed(http, "GET", f"{url}/sessions/{sid}", 200)

        def export(sid):
            return lambda: timed(http, "GET", f"{url}/sessions/{sid}/export", 200)

        def import_(blob):
            return lambda: timed(http, "POST", url + "/sessions/import", 201, json=blob)

        def fork(sid):
            return lambda: timed(http, "POST", f"{url}/sessions/{sid}/fork", 201, json={})

        figures, cpu = {}, {}
        name = "GET /sessions/{id} (baseline)"
        figures[name], _, cpu[name] = await rounds(http, [get(s) for s in sids], n_rounds, pid)
        name = "GET /sessions/{id}/export"
        figures[name], blobs, cpu[name] = await rounds(http, [export(s) for s in sids], n_rounds, pid)
        name = "POST /sessions/import"
        figures[name], _, cpu[name] = await rounds(http, [import_(b) for b in blobs], n_rounds, pid)
        name = "POST /sessions/{id}/fork"
        figures[name], _, cpu[name] = await rounds(http, [fork(s) for s in sids], n_rounds, pid)
        one = {}
        for name, calls in (("GET /sessions/{id} (baseline)", [get(sids[0])]), ("GET /sessions/{id}/export", [export(sids[0])]),
                            ("POST /sessions/import", [import_(blobs[0])]), ("POST /sessions/{id}/fork", [fork(sids[0])])):
            one[name], _, _ = await rounds(http, calls, n_rounds * 4, pid)

    data = blobs[0]["data"]
    raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    cfg = info["model"]["config"]
    print(f"model {info['model']['name']}@{info['model']['version']}: {cfg['num_layers']} layers x {cfg['hidden_size']} hidden, "
          f"state {info['model']['state_floats_per_session'] * 4:,} bytes")
    print(f"blob: {len(raw):,} bytes binary, {len(data):,} characters of base64url in `data`, "
          f"{len(json.dumps(blobs[0])):,} bytes as the export's JSON")
    rows = []
    base = np.median(figures["GET /sessions/{id} (baseline)"])
    for name, secs in figures.items():
        ms = np.array(secs) * 1e3
        rows.append([name, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                     float(np.median(one[name]) * 1e3), float(np.median(secs) / base), cpu[name] * 1e3])
    print(f"\n{concurrency} concurrent calls a round, {n_rounds} rounds (latency in ms; 'alone': one call at a time; "
          f"server CPU: user + system time of the server process per call under concurrency)")
    print(table(["call", "calls", "p50", "p90", "p99", "alone p50", "p50 / baseline p50", "server CPU ms/call"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shakespeare")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    server = charlstm_server(1, model=args.model, max_sessions=100_000)
    try:
        asyncio.run(run(server.url, server.proc.pid, args.concurrency, args.rounds))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
