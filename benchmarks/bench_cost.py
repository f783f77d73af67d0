"""The engine's own cost (issue 38): the server's CPU time per generated character against the model's
bare loop, and where each microsecond goes.

    python -m benchmarks.bench_cost [--clients 1,64] [--seconds 10] [--rounds 2] [--backend auto] [--profile-seconds 8]
                                    [--baseline DIR] [--env NAME=VALUE ...]

1. The bare loops, one thread, at B = 1 and B = 64 (onnx-int8 unless --bare names another): ONNX
   Runtime's own loop over the backend's step graph (run, argmax, outputs fed back, in numpy), and the
   backend's bare loop (`selector.bare_loop`: step + logits, the greedy character fed back, one step
   worker). The raw loop's microseconds per character are the model's own arithmetic: the reference.
2. The server: `charlstm serve` with default settings (backend auto; --backend names one) under C
   streaming clients of 256 characters (benchmarks.loadgen, its own process). The server's CPU seconds
   in the measured window are read from /proc for the process and all its threads, so the load
   generator's own CPU is not counted: CPU per character = those seconds / the characters the clients
   received in the window. With --baseline, another checkout's server is measured in alternate rounds;
   --env sets a CHARLSTM_* variable for this tree's server only (a setting against the default: the
   baseline may then be a worktree of the same commit).
3. Where it goes, under the same load in a separate window (so the profiler's own cost is not in 2's
   figure): each thread's exact CPU time (/proc/PID/task), split among stages by py-spy's samples of that
   thread, each sample put in one stage by its innermost frame of the project's: step (the backend's arithmetic), ingest (prompts), sample (choosing characters and the
   batch's bookkeeping in the step), output (text, stops, ends), schedule (admission and the loop),
   deliver (handing events to the event loop), HTTP/SSE (everything on the event loop: parsing, routing,
   the reader, formatting, writing), other. The shares times 2's CPU per character give microseconds.
Bare figures are measured before and after the servers; the ratio uses their mean. The machine's speed
drifts within a run (a shared host: 20% between minutes), so each round also runs the bare loop at its
client count right after its load, the server idle meanwhile: "CPU ratio, each round's bare loop" is the
median of the rounds' own ratios (and the best round's), the figure a drift moves least. What moves is the
server's figure: the bare loop holds within a few percent from round to round, the server's two busy cores
do not (2026-12-07: 30.8 to 38.2 us a character in four rounds of one run, against 21.1 to 21.9).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from service.model import store
from service.backends.base import set_kernel_threads
from service.backends.selector import bare_loop, build

from .bench_backends import cpu_name
from .common import ROOT, run_json, table, tree_server
from .loadgen import cpu_seconds

STAGES = ("step", "ingest", "sample", "output", "schedule", "deliver", "HTTP/SSE", "other")


def raw_onnx_loop(backend, batch: int, seconds: float) -> float:
    """chars/s of ONNX Runtime's own loop over the backend's step graph: run, argmax, the outputs fed back
    as the next inputs, in numpy; no torch, no backend code between the runs."""
    sess, inputs, outputs, L = backend._step, backend._inputs, backend._outputs, backend.num_layers
    feeds = {"ids": np.zeros(batch, np.int64)}
    for h, c in inputs:
        feeds[h] = feeds[c] = np.zeros((batch, backend.hidden), np.float32)
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < seconds:
        out = sess.run(outputs, feeds)
        feeds["ids"] = out[-1].argmax(1)
        for layer, (h, c) in enumerate(inputs):
            feeds[h], feeds[c] = out[layer], out[L + layer]
        steps += 1
    return batch * steps / (time.perf_counter() - t0)


def bare(model: str, name: str, batches: list[int], seconds: float) -> dict[tuple[str, int], float]:
    """chars/s at each B, one thread, one step worker: ("backend", B) the backend's bare loop
    (`selector.bare_loop`), ("raw", B) ONNX Runtime's own loop of the same graph (onnx backends)."""
    set_kernel_threads(1)
    backend = build(name, store.load(model), workers=1)
    try:
        got = {("backend", b): statistics.median(bare_loop(backend, b, seconds) for _ in range(3)) for b in batches}
        if name.startswith("onnx"):
            got.update({("raw", b): statistics.median(raw_onnx_loop(backend, b, seconds) for _ in range(3)) for b in batches})
        return got
    finally:
        backend.close()


def load(url: str, pid: int, clients: int, seconds: float) -> dict:
    return run_json(["-m", "benchmarks.loadgen", "--url", url, "--clients", str(clients), "--seconds", str(seconds),
                     "--warmup", "2", "--max-new-tokens", "256", "--cpu-pid", str(pid)], timeout=seconds + 600)


def stage_of(frames: list[str]) -> str:
    """The stage of one sampled stack (root first), by its innermost frame in a file that names one."""
    for frame in reversed(frames):
        where = frame.rsplit("(", 1)[-1]
        if "service/backends/" in where:
            return "ingest" if any("prefill" in f or "_ingest" in f for f in frames) else "step"
        if "service/sampling.py" in where or "service/engine/batch.py" in where or "service/engine/step.py" in where:
            return "sample"
        if "service/engine/output.py" in where:
            return "output"
        if "service/api/bridge.py" in where or frame.startswith("_flush "):
            return "deliver"
        if "service/engine/" in where:
            return "schedule"
        if any(k in where for k in ("service/api/", "starlette", "uvicorn", "fastapi", "sse_starlette", "asyncio", "httptools",
                                    "h11", "anyio", "pydantic")):
            return "HTTP/SSE"
    return "other"


def task_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process so far (loadgen.cpu_seconds of each task)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = cpu_seconds(pid, int(task.name))
        except OSError:
            continue  # a thread that ended meanwhile
    return out


def role(name: str) -> str:
    """A thread's part in the server, by its Python name."""
    for prefix, part in (("MainThread", "event loop"), ("charlstm-engine", "engine"), ("charlstm-step", "step workers"),
                         ("charlstm-sessions", "session store")):
        if name.startswith(prefix):
            return part
    return "other threads"


ROLES = ("event loop", "engine", "step workers", "session store", "other threads")


def profile(url: str, pid: int, clients: int, seconds: float) -> tuple[dict[str, float], dict[str, float]] | None:
    """(share of the server's CPU by stage, by thread role) under `clients` streams. Each thread's exact CPU
    time in the window (/proc) is split among stages by py-spy's samples of that thread (a sample of a
    thread that is runnable but waits for a core or the GIL counts as running: py-spy cannot tell)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("   (py-spy is not installed: no breakdown; `pip install py-spy`)")
        return None
    raw = Path(tempfile.mkdtemp(prefix="charlstm-spy-")) / "stacks.txt"
    loadgen = subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--clients", str(clients),
                                "--seconds", str(seconds + 3), "--warmup", "0", "--max-new-tokens", "256"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        time.sleep(1.5)  # the clients' first requests: a benchmark's warm-up, not a synchronisation
        before = task_cpu(pid)
        subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200", "--nonblocking",
                        "--threads", "--format", "raw", "--output", str(raw)], check=True, capture_output=True, timeout=seconds + 60)
        after = task_cpu(pid)
    finally:
        loadgen.wait(timeout=seconds + 600)
    names: dict[int, str] = {}
    samples: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        head, _, rest = stack.partition(";")
        if not head.startswith("thread (") or not n.isdigit():  # py-spy writes a frame it could not read as "(?"
            continue
        tid = int(head[len("thread ("):].split(")", 1)[0], 0)
        names[tid] = head.split(": ", 1)[-1]
        samples[tid][stage_of(rest.split(";"))] += int(n)
    cpu = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    total = sum(cpu.values()) or 1.0
    by_stage: collections.Counter[str] = collections.Counter()
    by_role: collections.Counter[str] = collections.Counter()
    for tid, seconds_used in cpu.items():
        name = names.get(tid, "?")
        by_role[role(name)] += seconds_used / total
        counts = samples.get(tid)
        if not counts:
            by_stage["step" if role(name) == "step workers" else "other"] += seconds_used / total
            continue
        n = sum(counts.values())
        for stage, k in counts.items():
            by_stage[stage] += seconds_used / total * k / n
    return {s: by_stage[s] for s in STAGES}, {r: by_role[r] for r in ROLES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--clients", default="1,64")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="the server's backend (default: its own default, auto)")
    ap.add_argument("--bare", default="onnx-int8", help="the backend whose bare loop is the reference")
    ap.add_argument("--bare-seconds", type=float, default=2.0)
    ap.add_argument("--profile-seconds", type=float, default=8.0, help="0: no breakdown")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout, measured in alternate rounds")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for this tree's server only, e.g. CHARLSTM_STREAM_INTERVAL_MS=50 (repeatable)")
    args = ap.parse_args()
    own_env = dict(e.split("=", 1) for e in args.env)
    clients = [int(c) for c in args.clients.split(",")]
    batches = sorted(set(clients))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; model {args.model}; bare loop {args.bare}, 1 thread, 1 step worker")
    before = bare(args.model, args.bare, batches, args.bare_seconds)
    builds = [("this tree", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    env_of = {"this tree": own_env, "baseline": {}}
    results = {(name, c): [] for name, _ in builds for c in clients}
    chosen = {}
    set_kernel_threads(1)
    paired = build(args.bare, store.load(args.model), workers=1)  # each round's own bare loop, run beside its load
    try:
        for _ in range(args.rounds):
            for name, tree in builds:
                srv = tree_server(tree, args.backend, **env_of[name])
                try:
                    chosen[name] = (httpx.get(srv.url + "/info", timeout=10).json()["engine"]["backend"] or {}).get("name", "?")
                    for c in clients:
                        got = load(srv.url, srv.proc.pid, c, args.seconds)
                        got["bare_chars_per_s"] = bare_loop(paired, c, args.bare_seconds)  # the server idle meanwhile
                        results[name, c].append(got)
                        print(f"  a round, {name}, {c} clients: the server {1e6 * got['server_cpu_s'] / max(1, got['window_chars']):.1f} us "
                              f"a character, the bare loop after it {1e6 / got['bare_chars_per_s']:.1f}", flush=True)
                finally:
                    srv.stop()
    finally:
        paired.close()
    after = bare(args.model, args.bare, batches, args.bare_seconds)
    ref = {b: (before["backend", b] + after["backend", b]) / 2 for b in batches}  # the reference
    raw = {b: (before["raw", b] + after["raw", b]) / 2 for b in batches} if ("raw", batches[0]) in before else None
    print("\n1. Bare loops, chars/s (before the servers / after): "
          + "; ".join(f"{k} B={b}: {before[k, b]:,.0f} / {after[k, b]:,.0f}" for k, b in sorted(before))
          + ". The ratios below use the backend's loop; the last column, ONNX Runtime's own (the strictest)")
    rows = []
    for name, _ in builds:
        for c in clients:
            r = results[name, c]
            cps = statistics.median(x["chars_per_s"] for x in r)
            us = statistics.median(1e6 * x["server_cpu_s"] / x["window_chars"] for x in r if x["window_chars"])
            bare_us = 1e6 / ref[c]
            own = [x["server_cpu_s"] / x["window_chars"] * x["bare_chars_per_s"] for x in r if x["window_chars"]]
            rows.append([name, chosen.get(name, "?"), c, cps, cps / ref[c], us, bare_us, us / bare_us,
                         f"{statistics.median(own):.2f} ({min(own):.2f})",
                         statistics.median(x["server_cpu_s"] for x in r) / args.seconds,
                         "-" if raw is None else f"{us * raw[c] / 1e6:.2f} ({1e6 / raw[c]:.0f} us)",
                         1e3 * statistics.median(x["ttft_p50"] for x in r)])
    print(f"\n2. The server over HTTP, {args.seconds:g} s x {args.rounds} rounds (medians), 256 characters a request"
          + (f"; this tree's server with {' '.join(args.env)}" if args.env else "") + "\n")
    print(table(["build", "backend", "clients", "chars/s", "/ bare chars/s", "server CPU us/char", "bare us/char",
                 "CPU ratio", "CPU ratio, each round's bare loop: median (best)", "server cores busy", "CPU ratio to ORT's own loop",
                 "first char p50 ms"], rows))
    if args.profile_seconds > 0:
        print(f"\n3. Where the server's CPU goes (py-spy, {args.profile_seconds:g} s at 200 Hz per build and client count; "
              "us/char = share x the CPU per character of 2)\n")
        prow, trow = [], []
        for name, tree in builds:
            srv = tree_server(tree, args.backend, **env_of[name])
            try:
                for c in clients:
                    got = profile(srv.url, srv.proc.pid, c, args.profile_seconds)
                    if got is None:
                        return
                    stages, roles = got
                    us = next(r[5] for r in rows if r[0] == name and r[2] == c)
                    prow.append([name, c, *(f"{100 * stages[s]:.0f}% {stages[s] * us:.0f}" for s in STAGES)])
                    trow.append([name, c, *(f"{100 * roles[r]:.0f}% {roles[r] * us:.0f}" for r in ROLES)])
            finally:
                srv.stop()
        print("by stage: share of the server's CPU, and us per character\n")
        print(table(["build", "clients", *STAGES], prow))
        print("\nby thread (exact CPU time of each thread in the window, /proc): share, and us per character\n")
        print(table(["build", "clients", *ROLES], trow))


if __name__ == "__main__":
    main()
