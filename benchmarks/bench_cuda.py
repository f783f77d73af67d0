"""The device step on a GPU: CUDA graph replay against eager launches, side by side in one run (issue 18, part 2).

    python -m benchmarks.bench_cuda [--model shakespeare] [--batches 1,64,256,1024] [--seconds 3] [--repeats 2]

A bare loop over `CudaStep.step()` (service/engine/cuda_step.py): head, per-row sampling at temperature
0.8 with each row's own counter-based random numbers, the fused LSTM step, and the one device-to-host
copy of the sampled ids a step. Graphs: replayed at the batch's bucket. Eager: the same kernels
launched one by one from Python, unpadded. For each B, eager then graphs, every round; medians.
Without a GPU it says so and exits (status 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from service import store
from service.engine.cuda_step import CudaStep
from service.engine.runner import Runner
from service.sampling import SamplingParams

from .common import table


@torch.inference_mode()
def loop(step: CudaStep, rows: int, seconds: float, state: torch.Tensor) -> float:
    """Characters per second of `rows` streams stepping back to back for about `seconds`."""
    step.batch.filter([])
    for i in range(rows):
        step.batch.append(state, SamplingParams(temperature=0.8), 1 + i, 0, [])
    for _ in range(10):  # warm-up
        step.step()
    torch.cuda.synchronize()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            step.step()  # ends in the ids' copy to the host, so every step is complete when it returns
        steps += 50
    return rows * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--batches", default="1,64,256,1024")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA GPU here (torch.cuda.is_available() is False; this torch is "
              f"{torch.__version__}). Run it on a machine with a GPU and a CUDA build of torch.", file=sys.stderr)
        sys.exit(2)
    batches = [int(b) for b in args.batches.split(",")]
    loaded = store.load(args.model)
    runner = Runner(loaded.model)
    capacity = max(batches)
    t0 = time.perf_counter()
    graphs = CudaStep(runner.weights, device="cuda", capacity=capacity)
    capture_s = time.perf_counter() - t0
    eager = CudaStep(runner.weights, device="cuda", capacity=capacity, graphs=False)
    with torch.inference_mode():
        state = runner.prefill(loaded.vocab.encode("KING:\n"), runner.zero_state())
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; model {loaded.name}@{loaded.version}; "
          f"{len(graphs.buckets)} graphs captured in {capture_s:.1f} s (buckets {graphs.buckets})\n")
    got = {(m, b): [] for m in ("eager", "graphs") for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            got["eager", b].append(loop(eager, b, args.seconds, state))
            got["graphs", b].append(loop(graphs, b, args.seconds, state))
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"Bare device loop, step + sampling + ids to host (chars/s; median of {args.repeats} round(s))")
    print(table(["B", "eager", "CUDA graphs", "graphs / eager", "us per step (graphs)"],
                [[b, med["eager", b], med["graphs", b], med["graphs", b] / med["eager", b], b / med["graphs", b] * 1e6]
                 for b in batches]))


if __name__ == "__main__":
    main()
