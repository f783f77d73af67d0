"""Serving throughput and latency against the model's own limit, measured side by side in one run.

    python -m benchmarks.bench_serving [--model shakespeare] [--seconds 15] [--threads 2]

1. Engine efficiency: a bare torch loop (fused step + sampling, no HTTP, no engine) for B streams,
   against the real service over HTTP with B concurrent streaming clients (load generator in its own process).
   The bare loop runs two ways, N OpenMP threads inside each kernel and N threads each stepping a share
   of the rows, and the faster of the two is the limit.
2. Batching pays: 64 clients against 1 client, and against a naive one-request-at-a-time server.
3. Latency under load at the default max batch and queue: TTFT and inter-token latency p50/p99,
   and the share of 429s past saturation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from service.model import store
from service.backends.base import Backend
from service.backends.selector import DEFAULT_STEP_WORKERS
from service.backends.torch_fp32 import TorchBackend

from .common import Proc, charlstm_server, loadgen, table


@torch.inference_mode()
def raw_limit(runner: Backend, batch: int, seconds: float, temperature: float = 1.0) -> float:
    """Characters per second of the fastest plain loop: fused step, softmax, multinomial. No engine.
    The backend's arrays are numpy's; the sampling stays torch's (softmax and multinomial over the logits,
    no copy either way), as this limit has always been measured."""
    state = runner.zero_state(batch)  # (2, L, B, H)
    ids = np.zeros(batch, dtype=np.int64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # warm-up
        state = runner.step(ids, state)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            logits = torch.from_numpy(runner.logits(state))  # (B, V)
            ids = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen).squeeze(1).numpy()  # (B,)
            state = runner.step(ids, state)
        steps += 50
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2, help="threads of the raw loop (the limit) and the naive server")
    ap.add_argument("--service-threads", type=int, default=1, help="torch threads of the service (its default)")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per load point")
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--latency-clients", default="1,16,64,128")
    ap.add_argument("--overload-clients", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of section 1; each figure is the median of its rounds")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = sorted({1, 64, *(int(b) for b in args.batches.split(","))})  # section 2 compares 64 with 1
    loaded = store.load(args.model)
    print(f"model {loaded.name}@{loaded.version}: {loaded.num_parameters:,} parameters; raw loop "
          f"{args.threads} threads; service {args.service_threads} torch thread(s) and its default of "
          f"{DEFAULT_STEP_WORKERS['torch']} step workers; naive {args.threads} threads\n")

    # Side by side: each load point runs right after its two limits, so a drift in the machine's speed
    # (a shared host) falls on both sides of the ratio. The idle server waits on a condition meanwhile.
    raw_seconds = min(args.seconds, 5.0)
    in_kernel_runner, split = TorchBackend(loaded), TorchBackend(loaded, workers=args.threads)
    rounds = {b: {"in_kernel": [], "by_rows": [], "served": []} for b in batches}
    srv = charlstm_server(args.service_threads, model=args.model, max_batch_size=max(batches), max_queue=256)
    try:
        for _ in range(args.repeats):
            for b in batches:
                torch.set_num_threads(args.threads)
                rounds[b]["in_kernel"].append(raw_limit(in_kernel_runner, b, raw_seconds))
                torch.set_num_threads(1)  # row-split: one OpenMP thread per worker (its pool threads start under this)
                rounds[b]["by_rows"].append(raw_limit(split, b, raw_seconds))
                rounds[b]["served"].append(loadgen(srv.url, b, args.seconds))
    finally:
        srv.stop()
        split.close()
    in_kernel = {b: statistics.median(r["in_kernel"]) for b, r in rounds.items()}
    by_rows = {b: statistics.median(r["by_rows"]) for b, r in rounds.items()}
    served = {b: statistics.median(x["chars_per_s"] for x in r["served"]) for b, r in rounds.items()}
    limit = {b: max(in_kernel[b], by_rows[b]) for b in batches}
    rows = [[b, in_kernel[b], by_rows[b], served[b], served[b] / limit[b]] for b in batches]
    print(f"1. Engine efficiency (generated characters per second; median of {args.repeats} round(s))")
    print(table(["B", f"raw, {args.threads} OpenMP threads", f"raw, {args.threads} row-split threads",
                 "service over HTTP", "service / faster raw"], rows))

    print("\n2. Batching pays")
    one, many = served.get(1), served.get(64)
    naive = {}
    if not args.skip_naive:
        nv = Proc(["-m", "benchmarks.naive_server", "--port", "{port}", "--model", args.model, "--threads", str(args.threads)],
                  env={"OMP_NUM_THREADS": str(args.threads)})
        try:
            naive = {b: loadgen(nv.url, b, args.seconds) for b in (1, 64)}
        finally:
            nv.stop()
    rows = [["service", one, many, many / one]]
    if naive:
        rows.append(["naive (one request at a time)", naive[1]["chars_per_s"], naive[64]["chars_per_s"],
                     naive[64]["chars_per_s"] / naive[1]["chars_per_s"]])
    print(table(["server", "1 client", "64 clients", "64 / 1"], rows))
    print(f"the faster raw loop's own 64 / 1: {limit[64] / limit[1]:.1f}x")
    if naive:
        print(f"service / naive at 64 clients: {many / naive[64]['chars_per_s']:.1f}x")

    print("\n3. Latency under load (default max batch 64, queue 256)")
    srv = charlstm_server(args.service_threads, model=args.model)
    try:
        lat = {c: loadgen(srv.url, c, args.seconds) for c in [int(c) for c in args.latency_clients.split(",")]}
        over = loadgen(srv.url, args.overload_clients, args.seconds)
    finally:
        srv.stop()
    rows = [[c, r["chars_per_s"], r["ttft_p50"] * 1e3, r["ttft_p99"] * 1e3, r["itl_p50"] * 1e3, r["itl_p99"] * 1e3,
             f"{r['share_429']:.1%}"] for c, r in [*lat.items(), (args.overload_clients, over)]]
    print(table(["clients", "chars/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "429 share"], rows))


if __name__ == "__main__":
    main()
