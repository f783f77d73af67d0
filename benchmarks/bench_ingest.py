"""Prompt ingestion by blocks, on one backend, without HTTP: the figures behind `prefill_rows` and
`prefill_chunk`.

    python -m benchmarks.bench_ingest [--backend onnx-int8] [--rows 1,2,4,8,16] [--chunks 64,128,256]

For each block shape (rows x characters), the time of one `Backend.ingest` call (best of 5) and its
characters per second: the time is what one loop's ingestion adds in front of the decode step at most,
the rate is how fast prompts go in. On ONNX Runtime, with the layers pipelined on two threads where the
backend measured that faster, and one layer after the other, side by side.
"""

from __future__ import annotations

import argparse
import time

from service.model import store
from service.backends.base import set_kernel_threads
from service.backends.selector import build

from .bench_backends import cpu_name
from .common import table


def best_of(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--backend", default="onnx-int8")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--chunks", default="64,128,256")
    a = ap.parse_args()
    set_kernel_threads(1)  # one thread a kernel, the service's default (a torch backend takes it when built)
    backend = build(a.backend, store.load(a.model), workers=1)
    pipelined = getattr(backend, "pipelined", False)
    print(f"CPU: {cpu_name()}; {a.backend}; layers pipelined on two threads: {pipelined}")
    rows_out = []
    try:
        for rows in map(int, a.rows.split(",")):
            for chunk in map(int, a.chunks.split(",")):
                slices = [[(7 * i + r) % backend.vocab_size for i in range(chunk)] for r in range(rows)]
                state = backend.zero_state(rows)
                t = best_of(lambda: backend.ingest(slices, state))
                row = [f"{rows} x {chunk}", t * 1000, rows * chunk / t]
                if pipelined:
                    backend.pipelined = False
                    t1 = best_of(lambda: backend.ingest(slices, state))
                    backend.pipelined = True
                    row += [t1 * 1000, rows * chunk / t1]
                rows_out.append(row)
    finally:
        backend.close()
    headers = ["block", "ms", "chars/s"] + (["ms, one layer after the other", "chars/s"] if pipelined else [])
    print(table(headers, rows_out))


if __name__ == "__main__":
    main()
