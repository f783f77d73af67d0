"""The engine alone (issue 38): its CPU a character with no HTTP, against the bare loop, in one process.

    python -m benchmarks.bench_engine [--backend onnx-int8] [--streams 64] [--chars 256] [--seconds 6] [--rounds 3]

`bench_cost` measures the whole server; this takes the HTTP side away, to say which part of the
server's cost is the engine's own. The engine is built as the server builds it (`server.engine_factory`,
default settings, the metrics observer attached), on one kernel thread as the bare loop. The main thread
takes each look's events, as the event loop would, and submits a new stream of `--chars` characters
whenever one ends, so `--streams` stay in flight. Rounds alternate two steps:

- **the backend's step**: the engine as it serves;
- **a step that costs nothing**: the backend's step replaced by a copy of the state and a fixed table of
  logits, so what remains is the engine's bookkeeping (scheduling, sampling, the rows' text, events,
  metrics) and the hand-over.

CPU is read from /proc for the engine thread and for the whole process (the main thread included) over each
window; characters are those of the streams that ended in it. The bare loop (`selector.bare_loop`, one
thread, B = --streams) is measured before and after; the ratios use the mean.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import threading
import time

import numpy as np

from service.backends.base import set_kernel_threads
from service.backends.selector import bare_loop
from service.engine.types import Done, GenerationRequest, SamplingParams
from service.metrics import EngineObserver, Metrics
from service.model import store
from service.server import engine_factory
from service.settings import Settings

from .bench_backends import cpu_name
from .common import table
from .loadgen import cpu_seconds

MODES = ("the backend's step", "a step that costs nothing")


def free_step(backend) -> None:
    """Replace the backend's step with one that costs (almost) nothing: the state copied, fixed logits."""
    logits = (np.random.default_rng(0).standard_normal((max(256, backend.max_rows), backend.vocab_size)) * 2).astype(np.float32)
    backend._advance = lambda ids, state: (state.copy(), logits[: ids.shape[0]])  # (2, L, B, H), (B, V)


def own_step(backend) -> None:
    """Give the backend its own step back (`free_step` shadowed its class's)."""
    vars(backend).pop("_advance", None)


def run(engine, tid: int, events: queue.SimpleQueue, prompt: list[int], streams: int, chars: int, seconds: float) -> dict:
    """`streams` in flight for `seconds`, each replaced as it ends; then the last ones drain."""
    def submit() -> None:
        engine.submit(GenerationRequest(list(prompt), chars, SamplingParams(temperature=1.0)), object())

    for _ in range(streams):
        submit()
    done_chars, live = 0, streams
    t0, cpu0, proc0 = time.perf_counter(), cpu_seconds(os.getpid(), tid), time.process_time()
    t_end = t0 + seconds
    while live:
        for _, batch in events.get():
            for event in batch:
                if isinstance(event, Done):
                    done_chars += event.completion_tokens
                    if time.perf_counter() < t_end:
                        submit()
                    else:
                        live -= 1
    elapsed = time.perf_counter() - t0
    return {"chars_per_s": done_chars / elapsed, "engine_us": (cpu_seconds(os.getpid(), tid) - cpu0) / done_chars * 1e6,
            "process_us": (time.process_time() - proc0) / done_chars * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--backend", default="onnx-int8")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--chars", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    set_kernel_threads(1)
    settings = Settings(backend=args.backend, max_batch_size=args.streams, backend_cache="")
    loaded = store.load(args.model)
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine, details = engine_factory(settings, events.put)(loaded, None)
    ref = f"{loaded.name}@{loaded.version}"
    engine.add_observer(EngineObserver(Metrics(), ref))
    backend = engine.backend
    prompt = loaded.vocab.encode("\n")  # the load generator's prompt
    bare = [bare_loop(backend, args.streams, 3.0)]
    engine.start()
    try:
        tid = next(t.native_id for t in threading.enumerate() if t.name == "charlstm-engine")
        got: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                if mode == MODES[1]:
                    free_step(backend)
                got[mode].append(run(engine, tid, events, prompt, args.streams, args.chars, args.seconds))
                own_step(backend)
    finally:
        engine.stop()
    bare.append(bare_loop(backend, args.streams, 3.0))
    bare_us = 1e6 / statistics.mean(bare)

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; model {ref}; backend {backend.name}, 1 kernel thread; "
          f"decode steps {details['decode_steps']}, quiet looks of {settings.quiet_steps}")
    print(f"\nBare loop, B = {args.streams}: {bare[0]:,.0f} / {bare[1]:,.0f} chars/s before / after ({bare_us:.1f} us a character)\n")
    rows = []
    for mode in MODES:
        med = {k: statistics.median(r[k] for r in got[mode]) for k in got[mode][0]}
        rows.append([mode, args.streams, med["chars_per_s"], f"{med['engine_us']:.1f}", f"{med['process_us']:.1f}",
                     f"{med['engine_us'] / bare_us:.2f}", f"{med['process_us'] / bare_us:.2f}"])
    print(f"The engine, {args.streams} streams of {args.chars} characters, {args.seconds:g} s x {args.rounds} rounds (medians)\n")
    print(table(["step", "streams", "chars/s", "engine thread us/char", "process us/char", "engine thread / bare",
                 "process / bare"], rows))


if __name__ == "__main__":
    main()
