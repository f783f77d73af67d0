"""/generate throughput of two builds side by side: this tree against another checkout of the project.

    python -m benchmarks.bench_ab --baseline /path/to/other/checkout [--clients 64] [--seconds 15] [--rounds 3]

Both servers start at once and stay up; the load generator (its own process) drives them in
alternate rounds, A B A B ..., so a drift in the machine's speed (a shared host) falls on both sides.
Each figure is the median of its rounds. Written to show that a feature nobody asks for costs nothing
(top-k log-probabilities and OpenAI's penalties), but it compares any two builds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .common import ROOT, loadgen, table
from tests.server import free_port


class Build:
    """`charlstm serve` run from a checkout's own sources (its `service` package shadows the installed one)."""

    def __init__(self, name: str, root: Path, model: str, threads: int):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"charlstm-ab-{name}-", suffix=".log", delete=False)
        env = dict(os.environ, CHARLSTM_MODEL=model, CHARLSTM_MODEL_STORE=str(ROOT / "model_store"), CHARLSTM_SESSION_DB="",
                   CHARLSTM_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads), CHARLSTM_LOG_LEVEL="warning",
                   PYTHONPATH=str(root))
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)], cwd=root,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling a probe with a deadline
        raise RuntimeError(f"{self.name} did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="another checkout of the project (for example `git archive` of main)")
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server (the service's default)")
    args = ap.parse_args()
    builds = [Build("baseline", Path(args.baseline).resolve(), args.model, args.threads),
              Build("this tree", ROOT, args.model, args.threads)]
    figures = {b.name: [] for b in builds}
    try:
        for b in builds:
            b.wait_ready()
        for r in range(args.rounds):
            for b in builds if r % 2 == 0 else builds[::-1]:
                figures[b.name].append(loadgen(b.url, args.clients, args.seconds)["chars_per_s"])
    finally:
        for b in builds:
            b.stop()
    base, ours = (statistics.median(figures[b.name]) for b in builds)
    print(f"/generate, {args.clients} streaming clients, {args.seconds:g} s a round, {args.rounds} rounds alternated; "
          f"median characters per second")
    print(table(["build", "chars/s (median)", "rounds"],
                [[b.name, statistics.median(figures[b.name]), ", ".join(f"{x:,.0f}" for x in figures[b.name])] for b in builds]))
    print(f"this tree / baseline: {ours / base:.3f}")


if __name__ == "__main__":
    main()
