"""What durable-before-acknowledged costs: session calls at 64 clients on the embedded store with its
session file, this tree under each fsync policy against another checkout (before the change: a snapshot
every 5 s, nothing written before an answer).

    python -m benchmarks.bench_durability --baseline /path/to/other/checkout [--clients 64] [--seconds 12] [--rounds 2]

Every server runs from its own tree's sources (PYTHONPATH), on the bundled model with one named
backend (auto could choose differently in two processes), with a session file in a fresh folder.
The builds and policies alternate round by round, so a drift in the machine's speed falls on all of
them; each figure is the median of its rounds. The load (benchmarks.session_clients) runs in its own
process: each client creates a session, then calls it back to back (16 new characters a call).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import httpx

from .bench_session_store import session_load
from .common import ROOT, Proc, table


def server(tree: Path, backend: str, fsync: str | None) -> Proc:
    folder = Path(tempfile.mkdtemp(prefix="charlstm-durability-"))
    env = dict(CHARLSTM_MODEL_STORE=str(ROOT / "model_store"), CHARLSTM_SESSION_DB=str(folder / "sessions.sqlite3"),
               CHARLSTM_BACKEND=backend, CHARLSTM_TORCH_THREADS="1", OMP_NUM_THREADS="1", CHARLSTM_LOG_LEVEL="warning",
               CHARLSTM_SESSION_CREATE_BURST="1000000", PYTHONPATH=str(tree))
    if fsync is not None:
        env["CHARLSTM_SESSION_FSYNC"] = fsync
    return Proc(["-m", "service.cli", "serve", "--port", "{port}"], env, cwd=tree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the build before the change")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backend", default="onnx-int8")
    ap.add_argument("--policies", default="always,everysec,os")
    args = ap.parse_args()
    sides = [("before", args.baseline.resolve(), None)] + [(f"after, {p}", ROOT, p) for p in args.policies.split(",")]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    for _ in range(args.rounds):
        for name, tree, policy in sides:
            srv = server(tree, args.backend, policy)
            try:
                results[name].append(session_load(srv.url, args.clients, args.seconds, 16))
                persistence = httpx.get(srv.url + "/ready", timeout=10).json()["session_store"].get("persistence") or {}
                results[name][-1]["group_commits"] = persistence.get("group_commits")
            finally:
                srv.stop()
    rows = []
    for name, _, _ in sides:
        r = results[name]
        med = lambda key: statistics.median(x[key] for x in r)  # noqa: E731
        commits = r[-1]["group_commits"]
        rows.append([name, med("calls_per_s"), med("p50") * 1e3, med("p99") * 1e3,
                     "-" if commits is None else f"{commits:,}", " ".join(f"{k}={v}" for k, v in r[-1]["status"].items())])
    print(f"\nSession calls, {args.clients} clients, 16 new characters a call, backend {args.backend}, "
          f"{args.seconds:g} s x {args.rounds} rounds (medians)\n")
    print(table(["build", "calls/s", "p50 ms", "p99 ms", "group commits (last round)", "statuses (last round)"], rows))
    base = rows[0]
    for row in rows[1:]:
        print(f"{row[0]} / before: p50 {row[2] / base[2]:.3f}x, p99 {row[3] / base[3]:.3f}x, calls/s {row[1] / base[1]:.3f}x")


if __name__ == "__main__":
    main()
