"""Issue 38, item 3: the engine core in a process of its own against the engine in the server's process.

    python -m benchmarks.bench_split [--clients 1,64] [--seconds 8] [--rounds 3] [--backend auto]

Both servers are this checkout's `charlstm serve` with default settings; the second runs each engine in
a spawned child process (benchmarks/split_engine.py), reached over a pipe. The rounds alternate between
the two. Each server's CPU per character is read from /proc for the server process, all its threads and
its child processes (the engine's), over the characters the clients received in the window; the load
generator runs in its own process. The reference is bench_cost's: the backend's bare loop on one thread,
measured before and after the servers.
"""

from __future__ import annotations

import argparse
import os
import statistics

import httpx

from .bench_backends import cpu_name
from .bench_cost import bare, load
from .common import ROOT, table, tree_server

VARIANTS = {"in process": ("-m", "service.cli", "serve"), "own process": ("-m", "benchmarks.split_engine")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--clients", default="1,64")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--bare", default="onnx-int8")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; model {args.model}; bare loop {args.bare}, 1 thread")
    before = bare(args.model, args.bare, sorted(set(clients)), 2.0)
    results = {(v, c): [] for v in VARIANTS for c in clients}
    chosen = {}
    for _ in range(args.rounds):
        for variant, command in VARIANTS.items():
            srv = tree_server(ROOT, args.backend, command)
            try:
                chosen[variant] = (httpx.get(srv.url + "/info", timeout=10).json()["engine"]["backend"] or {}).get("name", "?")
                for c in clients:
                    results[variant, c].append(load(srv.url, srv.proc.pid, c, args.seconds))
            finally:
                srv.stop()
    after = bare(args.model, args.bare, sorted(set(clients)), 2.0)
    print("bare loop chars/s (before / after): " + "; ".join(f"B={b}: {before['backend', b]:,.0f} / {after['backend', b]:,.0f}"
                                                             for b in sorted(set(clients))))
    rows = []
    for c in clients:
        ref = (before["backend", c] + after["backend", c]) / 2
        for variant in VARIANTS:
            r = results[variant, c]
            cps = statistics.median(x["chars_per_s"] for x in r)
            us = statistics.median(1e6 * x["server_cpu_s"] / x["window_chars"] for x in r if x["window_chars"])
            ttft = 1000 * statistics.median(x["ttft_p50"] for x in r)
            rows.append([variant, chosen.get(variant, "?"), c, cps, cps / ref, us, us * ref / 1e6, ttft,
                         " / ".join(f"{x['chars_per_s']:,.0f}" for x in r)])
    print(f"\n{args.seconds:g} s x {args.rounds} rounds (medians), 256 characters a streamed request\n")
    print(table(["engine", "backend", "clients", "chars/s", "/ bare chars/s", "server CPU us/char", "/ bare",
                 "first char p50 ms", "rounds' chars/s"], rows))


if __name__ == "__main__":
    main()
