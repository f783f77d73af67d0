"""Mixed traffic against two builds side by side: this tree and another checkout (the build before).

    python -m benchmarks.bench_mixed --baseline /path/to/other/checkout [--seconds 30] [--rounds 1]

Both servers (the bundled model, default settings) start at once and stay up; `benchmarks.mixed_load`
(its own process) drives them in alternate rounds, A B A B ..., so a drift in the machine's speed falls
on both. It sends 8 streams of 20,000-character prompts, one /v1/completions request of 5 prompts x n 64,
and 32 short interactive streams, and reports the short ones' time to first character and the total
characters per second. Issue 24's goal: short requests' first character p50 <= 100 ms, p99 <= 500 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .bench_ab import build
from .common import ROOT, run_json, table


def mixed(url: str, seconds: float) -> dict:
    return run_json(["-m", "benchmarks.mixed_load", "--url", url, "--seconds", str(seconds)], timeout=seconds + 600)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", required=True, type=Path, help="another checkout of the project (the build before)")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--model", default="shakespeare")
    a = p.parse_args()
    servers = {"before": build(a.baseline.resolve(), a.model, 1, "none"), "after": build(ROOT, a.model, 1, "none")}
    results: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for r in range(a.rounds):
            for name, server in servers.items():
                figures = mixed(server.url, a.seconds)
                print(f"round {r + 1} {name}: {json.dumps(figures)}", flush=True)
                results[name].append(figures)
    finally:
        for server in servers.values():
            server.stop()
    keys = ["short_ttft_p50_ms", "short_ttft_p99_ms", "short_ttft_max_ms", "short_completed", "short_still_waiting", "chars_per_s"]
    rows = []
    for name, rounds in results.items():
        rows.append([name] + [float(statistics.median(f[k] for f in rounds if f[k] is not None)) for k in keys])
    print(table(["build", "short TTFT p50 ms", "p99 ms", "max ms", "shorts done", "shorts waiting at the end", "chars/s"], rows))


if __name__ == "__main__":
    main()
