"""Prompt ingestion on the bundled model, one thread: the figures behind the scheduler's choices.

    python -m benchmarks.bench_ingest

1. Characters per second and the time of one slice by slice size (`prefill_chunk`): what a loop's budget
   costs the decode steps waiting behind it.
2. Batched ingestion: 8 slices of 512 in one LSTM call against 8 calls, and a lone slice run as 2 rows
   (the padding batched ingestion would need to give a prompt the same bits alone as under load), with
   a check of those bits: is a row's state from a call of 1 row the same as from a call of 2 or 8?
"""

from __future__ import annotations

import time

import torch

from service import store
from service.backends.torch_fp32 import TorchBackend

from .common import table


def best_of(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def main() -> None:
    torch.set_num_threads(1)
    model = store.load(store.DEFAULT_MODEL).model.eval()
    runner = TorchBackend(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 4096), generator=gen)
    rows = []
    for T in (32, 64, 128, 256, 512):
        def ingest():
            state = runner.zero_state()
            for a in range(0, 4096, T):
                state = runner.prefill(ids[0, a : a + T].tolist(), state)
        s = best_of(ingest)
        rows.append([T, 4096 / s, s / (4096 / T) * 1000])
    print("one stream, slices of T characters")
    print(table(["T", "chars/s", "ms a slice"], rows))

    L, H = model.config.num_layers, model.config.hidden_size
    h0 = torch.zeros(L, 8, H)

    def lstm(batch: int):
        x = model.embed(ids[:batch, :512])  # (B, 512, E)
        return model.lstm(x, (h0[:, :batch].contiguous(), h0[:, :batch].contiguous()))[1]

    one, two, eight = best_of(lambda: [lstm(1) for _ in range(8)]), best_of(lambda: lstm(2)), best_of(lambda: lstm(8))
    print("\n8 slices of 512: one call of 8 rows against 8 calls of 1 row; a lone slice as 2 rows")
    print(table(["how", "seconds", "chars/s"], [["8 calls of 1 row", one, 8 * 512 / one], ["1 call of 8 rows", eight, 8 * 512 / eight],
                                                ["a lone slice as 2 rows (x8)", 8 * two, 8 * 512 / (8 * two)]]))
    h1, h2, h8 = lstm(1)[0][:, 0], lstm(2)[0][:, 0], lstm(8)[0][:, 0]
    print(f"batched / one at a time: {one / eight:.2f}x; a lone slice as 2 rows costs {two / (one / 8):.2f}x a lone slice")
    print(f"row 0's state: 1 row == 2 rows: {torch.equal(h1, h2)}; 2 rows == 8 rows: {torch.equal(h2, h8)}")


if __name__ == "__main__":
    main()
