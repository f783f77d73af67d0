"""Session calls with the in-memory store against the Redis store, side by side, and Redis memory per session.

    python -m benchmarks.bench_session_store [--model shakespeare] [--clients 64] [--seconds 15] [--repeats 2] [--sessions 10000]

7. Latency: the same server settings with CHARLSTM_SESSION_STORE=memory and =redis://... (a real
   redis-server from Debian's package on a loopback port), C clients each calling its own session back
   to back; the two stores alternate for `repeats` rounds and the medians are reported, with the mean
   time of each store operation from /metrics.
8. Memory: Redis's used_memory (INFO memory) before and after N sessions of the model's state size,
   written through the store itself.
9. The store alone: lease and commit latency in one thread, no server, memory against Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
import numpy as np

from service.model import store
from service.sessions.redis_store import RedisSessionStore
from service.sessions.records import SessionRecord, new_session_id

from tests.redis_server import RedisServer

from .common import ROOT, charlstm_server, table

OPS = ("lease", "renew", "commit", "release", "create", "get")


def random_state(layers: int, hidden: int, rng: np.random.Generator) -> np.ndarray:
    """A session state of the model's size: (2, L, H) float32, as the engine hands the store."""
    return rng.standard_normal((2, layers, hidden), dtype=np.float32)


def session_load(url: str, clients: int, seconds: float, max_new_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.session_clients", "--url", url, "--clients", str(clients),
                          "--seconds", str(seconds), "--max-new-tokens", str(max_new_tokens)],
                         cwd=ROOT, capture_output=True, text=True, timeout=seconds + 600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def store_op_means(url: str) -> dict:
    """Mean seconds of each session store operation, from the server's histogram."""
    sums, counts = {}, {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            prefix = f"charlstm_session_store_seconds{suffix}{{operation=\""
            if line.startswith(prefix):
                op = line[len(prefix):].split('"', 1)[0]
                into[op] = float(line.rsplit(" ", 1)[1])
    return {op: sums[op] / counts[op] for op in sums if counts.get(op)}


def bench_latency(model: str, redis_url: str, clients: int, seconds: float, repeats: int, max_new_tokens: int) -> None:
    results = {"memory": [], "redis": []}
    ops = {"memory": [], "redis": []}
    for _ in range(repeats):
        for kind, target in (("memory", "memory"), ("redis", redis_url)):
            if kind == "redis":
                redis = __import__("redis").Redis.from_url(redis_url)
                redis.flushdb()
                redis.close()
            srv = charlstm_server(1, model=model, session_store=target, session_key="bench-session-key-0123456789abcdef")
            try:
                results[kind].append(session_load(srv.url, clients, seconds, max_new_tokens))
                ops[kind].append(store_op_means(srv.url))
            finally:
                srv.stop()
    rows = []
    for kind in ("memory", "redis"):
        r = results[kind]
        med = lambda key: statistics.median(x[key] for x in r)  # noqa: E731
        rows.append([kind, med("calls_per_s"), med("p50") * 1000, med("p99") * 1000,
                     " ".join(f"{k}={v}" for k, v in r[-1]["status"].items())])
    print(f"\n7. Session calls, {clients} clients, {max_new_tokens} new characters a call, {seconds:g} s x {repeats} rounds (medians)\n")
    print(table(["store", "calls/s", "p50 ms", "p99 ms", "statuses (last round)"], rows))
    mem, red = rows
    print(f"\nredis / memory: p50 {red[2] / mem[2]:.3f}x, p99 {red[3] / mem[3]:.3f}x, calls/s {red[1] / mem[1]:.3f}x")
    op_rows = [[op] + [statistics.median(o[op] for o in ops[k] if op in o) * 1e3 if any(op in o for o in ops[k]) else float("nan")
                       for k in ("memory", "redis")] for op in OPS]
    print("\nmean store operation time, ms (charlstm_session_store_seconds, as the server measured it, thread hand-off included)\n")
    print(table(["operation", "memory", "redis"], op_rows))


def bench_memory(model: str, redis_url: str, count: int) -> None:
    loaded = store.load(model)
    cfg = loaded.config
    layers, hidden = cfg.num_layers, cfg.hidden_size
    client = __import__("redis").Redis.from_url(redis_url)
    client.flushdb()
    s = RedisSessionStore(redis_url, count + 10, key=b"bench-session-key-0123456789abcdef", models={f"{loaded.name}@{loaded.version}": loaded.card["weights_sha256"]})
    s.claim()
    before = client.info("memory")["used_memory"]
    now, rng = time.time(), np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(count):
        s.create(SessionRecord(id=new_session_id(), state=random_state(layers, hidden, rng), seed=i, counter=0, position=6,
                               model=loaded.card["weights_sha256"], ttl_s=600.0, created_at=now, last_used=now))
    elapsed = time.perf_counter() - t0
    after = client.info("memory")["used_memory"]
    blob = len(client.hget(f"charlstm:session:{s.get(client.zrange('charlstm:lru', 0, 0)[0].decode()).id}", "blob"))
    assert s.count() == count
    per = (after - before) / count
    print(f"\n8. Redis memory: {count:,} sessions of {model} ({layers} x {hidden}) raise used_memory from "
          f"{before / 1e6:.1f} MB to {after / 1e6:.1f} MB: {per:,.0f} bytes per session; the blob is {blob:,} bytes "
          f"(raw state {2 * layers * hidden * 4:,}); created at {count / elapsed:,.0f} sessions/s through the store, one client")
    s.close()
    client.flushdb()
    client.close()


def bench_ops(model: str, redis_url: str, cycles: int) -> None:
    """One thread, no server: the store's own cost of one session call (lease, then commit)."""
    from service.sessions.memory_store import MemorySessionStore

    loaded = store.load(model)
    cfg, fingerprint = loaded.config, loaded.card["weights_sha256"]
    redis = __import__("redis").Redis.from_url(redis_url)
    redis.flushdb()
    redis.close()
    stores = {"memory": MemorySessionStore(10),
              "redis": RedisSessionStore(redis_url, 10, key=b"bench-session-key-0123456789abcdef", models={"bench@v1": fingerprint})}
    rows = []
    for kind, s in stores.items():
        now = time.time()
        record = s.create(SessionRecord(id=new_session_id(), state=random_state(cfg.num_layers, cfg.hidden_size, np.random.default_rng(1)), seed=1,
                                        counter=0, position=1, model=fingerprint, ttl_s=600.0, created_at=now, last_used=now))
        lease_t, commit_t = [], []
        for _ in range(cycles):
            t0 = time.perf_counter()
            lease = s.lease(record.id, 30)
            t1 = time.perf_counter()
            s.commit(lease, lease.record.advanced(lease.record.state, 1, lease.record.counter + 1, 1))
            t2 = time.perf_counter()
            lease_t.append(t1 - t0)
            commit_t.append(t2 - t1)
        q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1e3  # noqa: E731
        rows.append([kind, q(lease_t, 50), q(lease_t, 99), q(commit_t, 50), q(commit_t, 99)])
        s.close()
    print(f"\n9. The store alone, one thread, {cycles:,} lease + commit cycles on one {cfg.num_layers} x {cfg.hidden_size} session\n")
    print(table(["store", "lease p50 ms", "lease p99 ms", "commit p50 ms", "commit p99 ms"], rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--cycles", type=int, default=2_000)
    ap.add_argument("--parts", default="7,8,9", help="which of the sections to run")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    server = RedisServer()
    try:
        print(f"redis-server {subprocess.run([server.binary, '--version'], capture_output=True, text=True).stdout.split()[2]} "
              f"on {server.url}, no persistence")
        if "7" in parts:
            bench_latency(args.model, server.url, args.clients, args.seconds, args.repeats, args.max_new_tokens)
        if "8" in parts:
            bench_memory(args.model, server.url, args.sessions)
        if "9" in parts:
            bench_ops(args.model, server.url, args.cycles)
    finally:
        server.close()


if __name__ == "__main__":
    main()
