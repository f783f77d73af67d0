"""int8 weights against fp32 on the CPU, side by side in one run (issue 18, part 1).

    python -m benchmarks.bench_int8 [--model shakespeare] [--seconds 5] [--repeats 2] [--only raw,prefill,service,quality]

1. Raw loop: the fused step + softmax + multinomial (benchmarks.bench_serving.raw_limit), fp32 against
   int8, at B = 1, 8, 64, 128, interleaved (each B: fp32 then int8, every round), in the service's own
   configuration: 1 torch thread per kernel and each weights' default step workers (fp32 2, int8 1;
   row shares of 16+ rows).
2. Prompt ingestion, 10,000 characters: the fp32 torch backend's `prefill` in the engine's 512-character
   slices against the fp32 and int8 fused steps character by character.
3. The service over HTTP, `CHARLSTM_QUANTIZE=none` against `int8`, at 1 and 64 clients, interleaved;
   with --decode-steps 1,8 also each at several steps a look (`CHARLSTM_DECODE_STEPS`), and with
   --step-workers default,1,2 each with that many step workers (`CHARLSTM_STEP_WORKERS`).
   Needs a service that reports `quantize` in /info (the setting wired into the runner); skipped otherwise.
4. Quality (minutes): bits per char through the runner's step (service/backends/quality.py), fp32
   against int8, on the validation split (last 10% of tinyshakespeare.txt) and on macbeth.txt.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import numpy as np
import torch

from service.model import store
from service.backends.base import Backend, set_kernel_threads
from service.backends.selector import DEFAULT_STEP_WORKERS
from service.training.corpus import Corpus
from service.backends.quality import score_chunks_stepped
from service.backends.selector import WEIGHTS_BACKEND, build

from .bench_serving import raw_limit
from .common import ROOT, charlstm_server, loadgen, table

DATA = ROOT.parent / "shared" / "data"
MODES = ("none", "int8")


def bench_raw(loaded, batches: list[int], seconds: float, repeats: int, workers: int | None) -> None:
    set_kernel_threads(1)  # the service's default: row-split pool threads, one OpenMP thread each
    threads = {m: workers or DEFAULT_STEP_WORKERS[WEIGHTS_BACKEND[m]] for m in MODES}
    runners = {m: build(WEIGHTS_BACKEND[m], loaded, threads[m]) for m in MODES}
    got = {(m, b): [] for m in MODES for b in batches}
    try:
        for _ in range(repeats):
            for b in batches:
                for m in MODES:
                    got[m, b].append(raw_limit(runners[m], b, seconds))
    finally:
        for r in runners.values():
            r.close()
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"1. Raw loop, fused step + sampling (chars/s; median of {repeats} interleaved round(s); 1 torch thread, "
          f"step workers: fp32 {threads['none']}, int8 {threads['int8']})")
    print(table(["B", "fp32", "int8", "int8 / fp32"], [[b, med["none", b], med["int8", b], med["int8", b] / med["none", b]]
                                                        for b in batches]))
    for b in batches:
        print(f"   B = {b}: fp32 rounds {', '.join(f'{x:,.0f}' for x in got['none', b])}; "
              f"int8 rounds {', '.join(f'{x:,.0f}' for x in got['int8', b])}")


def bench_prefill(loaded, chars: int = 10_000) -> None:
    set_kernel_threads(1)
    text = (DATA / "tinyshakespeare.txt").read_text()[:chars]
    ids = loaded.vocab.encode(text)
    runners = {m: build(WEIGHTS_BACKEND[m], loaded, 1) for m in MODES}
    zero = runners["none"].zero_state()

    def slices(r: Backend) -> float:
        t0, state = time.perf_counter(), zero
        for i in range(0, len(ids), 512):
            state = r.prefill(ids[i : i + 512], state)
        return time.perf_counter() - t0

    def stepped(r: Backend) -> float:
        t0, s = time.perf_counter(), zero[:, :, None]  # (2, L, 1, H)
        for i in ids:
            s = r.step(np.array([i], dtype=np.int64), s)
        return time.perf_counter() - t0

    rows = [["fp32 torch backend, 512-char slices (prefill)", len(ids) / min(slices(runners["none"]) for _ in range(3))],
            ["fp32 fused step, char by char", len(ids) / stepped(runners["none"])],
            ["int8 fused step, char by char", len(ids) / stepped(runners["int8"])]]
    print(f"2. Prompt ingestion ({len(ids):,} characters, 1 thread)")
    print(table(["method", "chars/s"], rows))


def _reported_quantize(info: dict) -> str | None:
    """The `quantize` value anywhere in /info, or None where the service does not report one."""
    for key, value in info.items():
        if key == "quantize":
            return value
        if isinstance(value, dict) and (found := _reported_quantize(value)) is not None:
            return found
    return None


def bench_service(model: str, clients: list[int], seconds: float, repeats: int, steps: list[int],
                  workers: list[int | None] = (None,)) -> None:
    """Every (quantize, decode_steps, step_workers) server up at once; the load generator visits them in turn
    each round. A workers entry of None is each weights' default (service/server.py)."""
    configs = [(m, k, w) for k in steps for w in workers for m in MODES]
    servers = {}
    try:
        for m, k, w in configs:
            extra = {} if w is None else {"step_workers": w}
            servers[m, k, w] = charlstm_server(1, model=model, backend=WEIGHTS_BACKEND[m], max_batch_size=max(clients), decode_steps=k, **extra)
        for (m, k, w), srv in servers.items():
            reported = _reported_quantize(httpx.get(srv.url + "/info").json())
            if reported != m:
                print(f"3. Service over HTTP: skipped, the server started with CHARLSTM_QUANTIZE={m} reports "
                      f"quantize={reported!r} in /info (the setting is not wired into the runner yet)")
                return
        got = {(cfg, c): [] for cfg in configs for c in clients}
        for _ in range(repeats):
            for c in clients:
                for cfg in configs:  # the idle servers wait on a condition meanwhile
                    got[cfg, c].append(loadgen(servers[cfg].url, c, seconds)["chars_per_s"])
    finally:
        for srv in servers.values():
            srv.stop()
    med = {k: statistics.median(v) for k, v in got.items()}
    base = configs[0]

    def name(m: str, k: int, w: int | None) -> str:
        return (f"{'fp32' if m == 'none' else m}, {k} step{'s' if k > 1 else ''} a look"
                + ("" if w is None else f", {w} worker{'s' if w > 1 else ''}"))

    print(f"3. Service over HTTP, SSE streams (chars/s; median of {repeats} interleaved round(s), {seconds:g} s each; "
          f"ratios against {name(*base)}; step workers: each weights' default unless named)")
    print(table(["clients", *(name(*cfg) for cfg in configs), *(f"{name(*cfg)} / base" for cfg in configs[1:])],
                [[c, *(med[cfg, c] for cfg in configs), *(med[cfg, c] / med[base, c] for cfg in configs[1:])]
                 for c in clients]))
    for k in steps:
        for w in workers:
            print(f"int8 / fp32 at {k} step(s) a look{'' if w is None else f', {w} step workers'}: " + ", ".join(
                f"{c} client(s) {med[('int8', k, w), c] / med[('none', k, w), c]:.2f}" for c in clients))


def bench_quality(loaded) -> None:
    set_kernel_threads(1)
    texts = {"validation split": Corpus.read(DATA / "tinyshakespeare.txt").split()[1],
             "macbeth.txt": (DATA / "macbeth.txt").read_text(encoding="utf-8")}
    rows = []
    for name, text in texts.items():
        scores = {m: score_chunks_stepped(build(WEIGHTS_BACKEND[m], loaded, 1), loaded.vocab, [text]) for m in MODES}
        fp32, int8 = scores["none"], scores["int8"]
        rows.append([name, f"{fp32.chars:,}", f"{fp32.bits_per_char:.4f}", f"{int8.bits_per_char:.4f}",
                     f"{int8.bits_per_char - fp32.bits_per_char:+.4f}"])
    print("4. Quality (bits per char through the runner's step, state carried from a zero state)")
    print(table(["text", "chars scored", "fp32", "int8", "int8 - fp32"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per raw point; the service gets 2x")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--clients", default="1,64")
    ap.add_argument("--workers", type=int, default=None, help="step workers of the raw loop (default: the service's for each weights)")
    ap.add_argument("--only", default="raw,prefill,service,quality")
    ap.add_argument("--decode-steps", default="1", help="service: steps a look to compare, e.g. 1,8 (the first is the base)")
    ap.add_argument("--step-workers", default="default",
                    help="service: step workers to compare, e.g. default,1,2 ('default': each weights' own)")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    loaded = store.load(args.model)
    print(f"model {loaded.name}@{loaded.version}: {loaded.num_parameters:,} parameters; "
          f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}\n")
    if "raw" in parts:
        bench_raw(loaded, [int(b) for b in args.batches.split(",")], args.seconds, args.repeats, args.workers)
        print()
    if "prefill" in parts:
        bench_prefill(loaded)
        print()
    if "service" in parts:
        bench_service(args.model, [int(c) for c in args.clients.split(",")], 2 * args.seconds, args.repeats,
                      [int(k) for k in args.decode_steps.split(",")],
                      [None if w == "default" else int(w) for w in args.step_workers.split(",")])
        print()
    if "quality" in parts:
        bench_quality(loaded)


if __name__ == "__main__":
    main()
