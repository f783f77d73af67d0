"""Before and after: the service from another checkout against this one, over HTTP, side by side.

    git worktree add /tmp/before <commit>
    python -m benchmarks.bench_ab --before /tmp/before [--clients 1,64] [--seconds 10] [--repeats 3]

Both servers run at once (each idle while the other is measured) on the bundled model with the same
settings; the load points alternate before, after, before, after... so a drift in the machine's speed
falls on both sides. Each figure is the median of its rounds (generated characters per second).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from .common import ROOT, charlstm_server, loadgen, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the code to compare against")
    ap.add_argument("--clients", default="1,64")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--model", default="shakespeare@v1", help="the same model on both sides")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    sources = {"before": args.before.resolve(), "after": ROOT}
    servers = {k: charlstm_server(1, source=src, model=args.model, max_batch_size=args.max_batch_size) for k, src in sources.items()}
    figures = {k: {c: [] for c in clients} for k in servers}
    try:
        for r in range(args.repeats):
            for c in clients:
                for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    figures[k][c].append(loadgen(servers[k].url, c, args.seconds)["chars_per_s"])
    finally:
        for srv in servers.values():
            srv.stop()
    rows = []
    for c in clients:
        before, after = statistics.median(figures["before"][c]), statistics.median(figures["after"][c])
        rows.append([c, before, after, after / before])
    print(f"before: {sources['before']}\nafter:  {sources['after']}\n{args.repeats} rounds of {args.seconds:g} s, medians\n")
    print(table(["clients", "before chars/s", "after chars/s", "after / before"], rows))


if __name__ == "__main__":
    main()
