"""The CUDA path (issue 18, part 2): the bare device loop, the engine, and the service over HTTP, side by side in one run.

    python -m benchmarks.bench_cuda [--model shakespeare] [--batches 1,64,256,1024] [--steps 16] [--seconds 2]
                                    [--repeats 2] [--http-clients 256] [--http-seconds 8] [--no-http]

1. Bare device loop (no engine): `CudaStep` (service/backends/cuda.py) at temperature 0.8: the step,
   per-row sampling with each row's counter-based random numbers and the ids' copy to the host, three
   ways: eager launches one step at a time, one CUDA graph a step, and one graph of --steps steps a look.
2. The engine (no HTTP), in device mode, two ways: B requests of `--chars` characters submitted at once
   (admission, prompt ingestion, the ramp up and the ragged end included), and steady state: B requests
   always in flight, a new one submitted as each ends, characters counted over --seconds after warm-up.
   2b. Where a look's time goes at the largest B: the engine loop's phases (admission, prompt ingestion
   with the device batch's appends, the device's decode, the rows' text, the batch's filter, delivery)
   timed on the engine thread, in ms a look and as shares of the wall time.
3. Over HTTP: `charlstm serve --device cuda` with --http-clients clients sending plain /generate
   requests back to back (load generators in several processes, loopback only), and the same with
   SSE streams.
Without a GPU it says so and exits (status 2); `--device cpu` runs the same code eagerly on the CPU, a
smoke test of the benchmark itself whose figures say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from service.model import store
from service.backends.base import Backend
from service.backends.cuda import CudaBackend, CudaStep
from service.engine.engine import Engine, EngineConfig
from service.backends.torch_fp32 import TorchBackend
from service.engine.types import Done, GenerationRequest
from service.sampling import SamplingParams

from .common import ROOT, charlstm_server, table


@torch.inference_mode()
def bare_loop(step: CudaStep, rows: int, k: int, seconds: float, state: np.ndarray) -> float:
    """Characters per second of `rows` streams stepping back to back for about `seconds`, k steps a look.
    state: (2, L, H) float32 on the host, every row's start (`DeviceBatch.append` copies it to the device)."""
    step.batch.filter([])
    for i in range(rows):
        step.batch.append(state, SamplingParams(temperature=0.8), 1 + i, 0, [])
    for _ in range(5):  # warm-up
        step.decode(k, full=False)
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    looks, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(max(1, 50 // k)):
            step.decode(k, full=False)  # ends in the ids' copy to the host, so every step is complete when it returns
        looks += max(1, 50 // k)
    return rows * k * looks / (time.perf_counter() - t0)


# The engine loop's phases, timed on one engine instance: where a look's wall time goes besides the device.
# (label, the part of the engine that owns it, the method): admission and prompt ingestion (with the device
# batch's appends) are the engine's, the look is its Stepper's, the rows' text its Output's.
PHASES = (("admit", None, "_admit"), ("ingest", None, "_ingest"), ("device look", "stepper", "device_look"),
          ("rows' text", "output", "process"), ("drop finished", None, "_drop_finished"), ("flush", None, "_flush"))


def time_phases(engine: Engine, device_step: CudaStep) -> tuple[dict[str, float], dict[str, int]]:
    """Wrap these phases (and the device step's `decode`, the wait for the GPU and the ids' copy) on this
    engine instance only (device_step: its backend's decoder); returns the dicts their seconds and their calls add up in."""
    names = ("decode", *(label for label, _, _ in PHASES))
    spent, calls = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)

    def timed(name: str, inner):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        return run

    for label, part, method in PHASES:
        owner = engine if part is None else getattr(engine, part)
        setattr(owner, method, timed(label, getattr(owner, method)))
    device_step.decode = timed("decode", device_step.decode)
    return spent, calls


def phase_rows(spent: dict[str, float], looks: int, seconds: float) -> list[list]:
    """Per look: milliseconds of each phase (the device look without its decode) and the share of the wall time."""
    own = dict(spent)
    own["device look"] -= own["decode"]
    rows = [[name, own[name] / looks * 1e3, own[name] / seconds] for name in ("decode", *(label for label, _, _ in PHASES))]
    rest = seconds - sum(spent[label] for label, _, _ in PHASES)
    return rows + [["rest of the loop (waits, locks, bookkeeping)", rest / looks * 1e3, rest / seconds]]


def engine_run(runner: Backend, vocab, streams: int, chars: int) -> float:
    """Characters per second of `streams` requests of `chars` characters each through an engine on the cuda backend."""
    done, finished = [], threading.Event()

    def deliver(batch):
        for _, events in batch:
            done.extend(e for e in events if isinstance(e, Done))
        if len(done) == streams:
            finished.set()

    engine = Engine(runner, vocab, EngineConfig(max_batch_size=streams, max_queue=streams, decode_steps=runner.decoder.max_steps), deliver)
    engine.start()
    try:
        t0 = time.perf_counter()
        for i in range(streams):
            engine.submit(GenerationRequest(prompt_ids=vocab.encode("\n"), max_new_tokens=chars, seed=i,
                                            params=SamplingParams(temperature=0.8), stream_tokens=False), i)
        assert finished.wait(600), "the engine did not finish"
        seconds = time.perf_counter() - t0
    finally:
        engine.stop()
    assert all(d.finish_reason == "length" and d.completion_tokens == chars for d in done)
    return streams * chars / seconds


def engine_steady(runner: Backend, vocab, streams: int, chars: int, seconds: float, phases: list | None = None) -> float:
    """Characters per second with `streams` requests always in flight (each Done submits the next),
    each request's characters spread evenly over its time, counted in a window after one second of warm-up.
    With `phases` (a list), the loop's phases are timed over the whole run and their rows appended to it."""
    spans, lock, stop = [], threading.Lock(), threading.Event()
    engine = None
    started: dict[int, float] = {}
    serial = iter(range(1 << 30))

    def submit() -> None:
        i = next(serial)
        started[i] = time.perf_counter()
        engine.submit(GenerationRequest(prompt_ids=vocab.encode("\n"), max_new_tokens=chars, seed=i,
                                        params=SamplingParams(temperature=0.8), stream_tokens=False), i)

    def deliver(batch):
        for i, events in batch:
            for e in events:
                if isinstance(e, Done):
                    with lock:
                        spans.append((started.pop(i), time.perf_counter(), e.completion_tokens))
                    if not stop.is_set():
                        submit()

    device_step = runner.decoder
    engine = Engine(runner, vocab, EngineConfig(max_batch_size=streams, max_queue=streams, decode_steps=device_step.max_steps), deliver)
    decode = device_step.decode
    spent, calls = time_phases(engine, device_step) if phases is not None else (None, None)
    engine.start()
    try:
        for _ in range(streams):
            submit()
        t0 = time.perf_counter()
        lo, hi = t0 + 1.0, t0 + 1.0 + seconds
        time.sleep(max(0.0, hi - time.perf_counter()))  # the measuring window; the engine runs on its own thread
        stop.set()
        assert engine.wait_idle(600), "the engine did not finish"
        total = time.perf_counter() - t0
    finally:
        engine.stop()
        device_step.decode = decode
    if spent is not None:
        phases.extend(phase_rows(spent, calls["device look"], total))
    with lock:
        window = sum(n * max(0.0, min(t1, hi) - max(a, lo)) / (t1 - a) for a, t1, n in spans if t1 > a)
    return window / (hi - lo)


def http_load(url: str, clients: int, seconds: float, plain: bool, chars: int, processes: int) -> dict:
    """Sum the figures of `processes` load generators, each driving clients / processes clients at once."""
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    cmd = lambda n, first: [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--clients", str(n),  # noqa: E731
                            "--seconds", str(seconds), "--warmup", "3", "--max-new-tokens", str(chars),
                            "--temperature", "0.8", "--first-seed", str(first), *(["--plain"] if plain else [])]
    procs, first = [], 0
    for n in per:
        procs.append(subprocess.Popen(cmd(n, first), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
        first += n
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=seconds + 600)
        if p.returncode != 0:
            raise RuntimeError(stderr[-2000:])
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    statuses: dict[str, int] = {}
    for o in outs:
        for k, v in o["status"].items():
            statuses[k] = statuses.get(k, 0) + v
    key = "latency_p50" if plain else "itl_p50"
    return {"chars_per_s": sum(o["chars_per_s"] for o in outs), "statuses": statuses,
            key: statistics.median(o[key] for o in outs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--batches", default="1,64,256,1024")
    ap.add_argument("--steps", type=int, default=16, help="steps a look (the serve setting decode_steps)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engine-streams", default="1,64,256")
    ap.add_argument("--chars", type=int, default=2000, help="characters a request generates (engine and HTTP)")
    ap.add_argument("--http-clients", type=int, default=256)
    ap.add_argument("--http-seconds", type=float, default=8.0)
    ap.add_argument("--http-processes", type=int, default=4)
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--modes", default="eager,graph a step,graph of k steps", help="bare-loop columns to measure")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: no CUDA GPU here (torch.cuda.is_available() is False; this torch is "
              f"{torch.__version__}). Run it on a machine with a GPU and a CUDA build of torch.", file=sys.stderr)
        sys.exit(2)
    batches = [int(b) for b in args.batches.split(",")]
    loaded = store.load(args.model)
    runner = TorchBackend(loaded, device=args.device)  # ingests prompts (cuDNN's nn.LSTM on a GPU)
    capacity = max(batches)
    t0 = time.perf_counter()
    graphs = CudaStep(runner.weights, device=args.device, capacity=capacity, max_steps=args.steps)
    capture_s = time.perf_counter() - t0
    eager = CudaStep(runner.weights, device=args.device, capacity=capacity, graphs=False)
    state = runner.prefill(loaded.vocab.encode("KING:\n"), runner.zero_state())  # (2, L, H) numpy
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (a smoke run: eager, no graphs)"
    print(f"{name}, torch {torch.__version__}; model {loaded.name}@{loaded.version}; "
          f"{len(graphs._graphs)} graphs captured in {capture_s:.1f} s (buckets {graphs.buckets}, 1 and {args.steps} steps, "
          f"lean and full sampler)\n", flush=True)

    modes = {"eager": (eager, 1), "graph a step": (graphs, 1), f"graph of {args.steps} steps": (graphs, args.steps)}
    wanted = [m.replace("k steps", f"{args.steps} steps") for m in args.modes.split(",")]
    modes = {m: v for m, v in modes.items() if m in wanted}
    got = {(m, b): [] for m in modes for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            for m, (s, k) in modes.items():
                got[m, b].append(bare_loop(s, b, k, args.seconds, state))
    bare = {k: statistics.median(v) for k, v in got.items()}
    best = lambda b: max(bare[m, b] for m in modes)  # noqa: E731
    print(f"1. Bare device loop, step + sampling (T = 0.8) + ids to host (chars/s; median of {args.repeats} rounds)")
    base = "eager" if "eager" in modes else next(iter(modes))
    print(table(["B", *modes, f"best / {base}", "us per step (best)"],
                [[b, *(bare[m, b] for m in modes), best(b) / bare[base, b], b / best(b) * 1e6] for b in batches]), flush=True)
    del graphs, eager
    torch.cuda.empty_cache()

    streams = [int(b) for b in args.engine_streams.split(",")]
    rows = []
    for b in streams:
        backend = CudaBackend(loaded, device=args.device, capacity=b, max_steps=args.steps)
        at_once = statistics.median(engine_run(backend, loaded.vocab, b, args.chars) for _ in range(args.repeats))
        steady = statistics.median(engine_steady(backend, loaded.vocab, b, args.chars, args.seconds * 2)
                                   for _ in range(args.repeats))
        del backend
        limit = bare.get((f"graph of {args.steps} steps", b), float("nan"))
        rows.append([b, at_once, steady, limit, steady / limit])
    print(f"\n2. The engine, no HTTP: B requests of {args.chars} characters, {args.steps} steps a look (chars/s; "
          f"at once: first submit to last Done; steady: B always in flight, {args.seconds * 2:g} s window; median of {args.repeats})")
    print(table(["B", "engine, at once", "engine, steady", f"bare graph of {args.steps} steps", "steady / bare"], rows), flush=True)
    b = max(streams)
    backend = CudaBackend(loaded, device=args.device, capacity=b, max_steps=args.steps)
    phases: list = []
    steady = engine_steady(backend, loaded.vocab, b, args.chars, args.seconds * 2, phases)
    del backend
    print(f"\n2b. Where a look's time goes, steady state at B = {b} ({steady:,.0f} chars/s with the timers on; the "
          f"engine's loop phases timed on the engine thread; decode: launching the look, waiting for it and the ids' copy)")
    print(table(["phase", "ms a look", "share of the wall time"], phases), flush=True)

    if args.no_http:
        return
    del runner
    torch.cuda.empty_cache()
    server = charlstm_server(1, model=args.model, device=args.device, max_batch_size=max(args.http_clients, 1),
                             max_queue=args.http_clients, decode_steps=args.steps, max_new_tokens=max(args.chars, 4096))
    try:
        rows = []
        for plain, clients in ((True, 1), (True, args.http_clients), (False, args.http_clients)):
            out = http_load(server.url, clients, args.http_seconds, plain, args.chars, min(args.http_processes, clients))
            rows.append(["plain" if plain else "SSE", clients, out["chars_per_s"],
                         out.get("latency_p50", out.get("itl_p50")), json.dumps(out["statuses"])])
    finally:
        server.stop()
    print(f"\n3. Over HTTP: charlstm serve --device {args.device} --decode-steps {args.steps}, clients sending {args.chars}-character "
          f"requests back to back for {args.http_seconds:g} s after 3 s of warm-up ({args.http_processes} load-generator processes)")
    print(table(["mode", "clients", "chars/s", "p50 (plain: request s; SSE: inter-char s)", "statuses"], rows))
    bare_256 = bare.get((f"graph of {args.steps} steps", args.http_clients))
    if bare_256:
        print(f"HTTP plain at {args.http_clients} clients / bare loop at B = {args.http_clients}: {rows[1][2] / bare_256:.2f}")


if __name__ == "__main__":
    main()
