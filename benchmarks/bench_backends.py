"""Every compute backend side by side in one run (issue 25): bare loop, quality, the service over HTTP.

    python -m benchmarks.bench_backends [--model shakespeare] [--seconds 1] [--rounds 5] [--only choice,bare,quality,service]
                                        [--macbeth-chars 20000] [--http-seconds 6] [--decode-steps 1,8]

1. choice: what `--backend auto` measures at start-up (`selector.choose`) and what it serves.
2. bare: each backend's bare loop (step + logits, the greedy character fed back: `selector.bare_loop`) at
   B = 1, 8, 64, 128, one thread a kernel, each backend's default step workers; rounds interleaved (every B,
   every backend, every round), medians.
3. quality: bits per character through each backend's own step on the first characters of Macbeth
   (`../shared/data/macbeth.txt`, a play the model never saw), against the fp32 reference's (torch's, or
   ONNX Runtime's fp32 where torch is not installed: `selector.reference_backend`).
4. service: `charlstm serve --backend NAME` over HTTP at 1 and 64 streaming clients, each decode-steps
   value, the backends interleaved; the ratio to that backend's bare loop at the same B is the host's share.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from service.model import store
from service.backends.base import kernel_threads, set_kernel_threads
from service.backends.quality import score_chunks_stepped
from service.backends.selector import available, bare_loop, build, choose, reference_backend

from .common import ROOT, charlstm_server, loadgen, table

MACBETH = ROOT.parent / "shared" / "data" / "macbeth.txt"


def cpu_name() -> str:
    """The CPU's model and the vector extensions that decide the ranking (read, never assumed)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(wanted) or 'no AVX2'})"


def bench_choice(loaded, max_batch_size: int) -> None:
    t0 = time.perf_counter()
    choice = choose(loaded, available(), max_batch_size)
    took = time.perf_counter() - t0
    print(f"1. --backend auto at start-up ({took:.1f} s): serves {choice.backend.name}")
    print(table(["backend", "B=1 chars/s", f"B={max_batch_size} chars/s", "bits/char cost", "dropped"],
                [[t.name, t.chars_per_s.get(1, 0.0), t.chars_per_s.get(max_batch_size, 0.0),
                  "?" if t.bits_cost is None else f"{t.bits_cost:+.4f}", t.dropped or ""] for t in choice.trials]))
    choice.backend.close()


def bench_bare(loaded, names: tuple[str, ...], batches: list[int], seconds: float, rounds: int) -> dict[tuple[str, int], float]:
    backends = {n: build(n, loaded) for n in names}
    got = {(n, b): [] for n in names for b in batches}
    try:
        for _ in range(rounds):
            for b in batches:
                for n in names:
                    got[n, b].append(bare_loop(backends[n], b, seconds))
    finally:
        for backend in backends.values():
            backend.close()
    med = {k: statistics.median(v) for k, v in got.items()}
    ref = reference_backend()
    print(f"\n2. Bare loop, step + logits, greedy (chars/s; median of {rounds} interleaved rounds of {seconds:g} s; "
          f"{kernel_threads()} thread a kernel)")
    print(table(["B", *names, *(f"{n} / {ref}" for n in names if n != ref)],
                [[b, *(med[n, b] for n in names), *(med[n, b] / med[ref, b] for n in names if n != ref)] for b in batches]))
    return med


def bench_quality(loaded, names: tuple[str, ...], chars: int) -> None:
    if not MACBETH.exists():
        print(f"\n3. Quality: skipped ({MACBETH} is not here)")
        return
    text = MACBETH.read_text(encoding="utf-8")[:chars]
    bits = {}
    for n in names:
        backend = build(n, loaded)
        try:
            bits[n] = score_chunks_stepped(backend, loaded.vocab, [text]).bits_per_char
        finally:
            backend.close()
    print(f"\n3. Quality: bits/char through each backend's step on Macbeth's first {len(text):,} characters")
    ref = reference_backend()
    print(table(["backend", "bits/char", f"against {ref}"], [[n, f"{bits[n]:.4f}", f"{bits[n] - bits[ref]:+.4f}"] for n in names]))


def bench_service(loaded_name: str, names: tuple[str, ...], seconds: float, decode_steps: list[int],
                  bare: dict[tuple[str, int], float]) -> None:
    rows = []
    for steps in decode_steps:
        for clients in (1, 64):
            for n in names:
                server = charlstm_server(1, model=loaded_name, backend=n, decode_steps=steps, max_batch_size=64)
                try:
                    out = loadgen(server.url, clients, seconds)
                finally:
                    server.stop()
                ref = bare.get((n, clients))
                rows.append([n, steps, clients, out["chars_per_s"], ref or 0.0, out["chars_per_s"] / ref if ref else 0.0])
    print(f"\n4. The service over HTTP, /generate streaming 256 characters a request, {seconds:g} s a point")
    print(table(["backend", "decode steps", "clients", "chars/s", "bare loop at that B", "service / bare"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--seconds", type=float, default=1.0, help="each bare-loop point of a round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--macbeth-chars", type=int, default=20000)
    ap.add_argument("--http-seconds", type=float, default=6.0)
    ap.add_argument("--decode-steps", default="1,8")
    ap.add_argument("--only", default="choice,bare,quality,service")
    args = ap.parse_args()
    set_kernel_threads(1)  # the service's default (torch's too, once a torch backend loads it)
    only = set(args.only.split(","))
    loaded = store.load(args.model)
    names = available()
    print(f"{cpu_name()}; {kernel_threads()} thread a kernel; backends {', '.join(names)}; model {loaded.name}@{loaded.version}")
    if "choice" in only:
        bench_choice(loaded, 64)
    bare = bench_bare(loaded, names, [int(b) for b in args.batches.split(",")], args.seconds, args.rounds) if "bare" in only else {}
    if "quality" in only:
        bench_quality(loaded, names, args.macbeth_chars)
    if "service" in only:
        bench_service(args.model, names, args.http_seconds, [int(s) for s in args.decode_steps.split(",")], bare)


if __name__ == "__main__":
    main()
