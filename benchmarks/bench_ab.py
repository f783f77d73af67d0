"""/generate throughput of two builds side by side: this tree against another checkout of the project.

    python -m benchmarks.bench_ab --baseline /path/to/other/checkout [--clients 64] [--seconds 15] [--rounds 3] [--engine] [--quantize int8]

Both servers start at once and stay up; the load generator (its own process) drives them in
alternate rounds, A B A B ..., so a drift in the machine's speed (a shared host) falls on both sides.
Each figure is the median of its rounds. With --engine, the same comparison without HTTP: each round
runs `clients` streams of 256 characters through a bare Engine in a fresh process of each build
(less noise on a busy host, and only the engine's own cost). Written to show that a feature nobody asks for costs nothing
(top-k log-probabilities and OpenAI's penalties), but it compares any two builds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .common import ROOT, Proc, loadgen, table


def build(root: Path, model: str, threads: int, quantize: str, backend: str | None) -> Proc:
    """`charlstm serve` run from a checkout's own sources (its `service` package shadows the installed one).
    The backend is named, not `auto`: two processes timing the candidates at start-up may choose differently."""
    env = dict(CHARLSTM_MODEL=model, CHARLSTM_MODEL_STORE=str(ROOT / "model_store"), CHARLSTM_SESSION_DB="",
               CHARLSTM_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads), CHARLSTM_LOG_LEVEL="warning",
               PYTHONPATH=str(root))
    if backend:
        env["CHARLSTM_BACKEND"] = backend
    elif quantize != "none":  # a build from before the backends: --quantize picks its weights
        env["CHARLSTM_QUANTIZE"] = quantize
    return Proc(["-m", "service.cli", "serve", "--port", "{port}"], env, cwd=root)


# Run in each build's own tree: `clients` streams of 256 characters through the engine, characters per second.
# Either side may be a build from before the numpy serving path (torch threads, backends built from the torch
# module) or after it (`set_kernel_threads`, backends built from the loaded model, torch only where one needs it).
ENGINE_ROUND = """
import sys, threading, time
from service.model import store
from service.engine.engine import Engine, EngineConfig
from service.backends.selector import build
from service.engine.types import Done, GenerationRequest
try:
    from service.backends.base import set_kernel_threads
except ImportError:
    import torch
    set_kernel_threads = torch.set_num_threads
set_kernel_threads(1)
clients, model, backend = int(sys.argv[1]), sys.argv[2], sys.argv[3]
loaded = store.load(model)
weights = loaded if hasattr(loaded, "tensors") else loaded.model
left, done = [clients], threading.Event()
def deliver(batch):
    for _, events in batch:
        if any(isinstance(e, Done) for e in events):
            left[0] -= 1
    if left[0] == 0:
        done.set()
engine = Engine(build(backend, weights), loaded.vocab, EngineConfig(max_batch_size=clients), deliver)
for i in range(clients):
    engine.submit(GenerationRequest(prompt_ids=loaded.vocab.encode("ROMEO:"), max_new_tokens=256, seed=i), i)
t0 = time.perf_counter()
engine.start()
assert done.wait(600)
print(clients * 256 / (time.perf_counter() - t0))
engine.stop()
"""


def engine_round(root: Path, clients: int, model: str, backend: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", CHARLSTM_MODEL_STORE=str(ROOT / "model_store"))
    out = subprocess.run([sys.executable, "-c", ENGINE_ROUND, str(clients), model, backend], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="another checkout of the project (for example `git archive` of main)")
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server (the service's default)")
    ap.add_argument("--prompt", default="\n", help="every request's prompt (HTTP rounds)")
    ap.add_argument("--engine", action="store_true", help="measure the bare engine in each build, without HTTP")
    ap.add_argument("--backend", default="onnx-int8", help="the compute backend of both builds (named: see build())")
    ap.add_argument("--quantize", default="none", choices=["none", "int8"], help="weights of a baseline from before the backends (with --backend '')")
    args = ap.parse_args()
    if args.engine:
        roots = {"baseline": Path(args.baseline).resolve(), "this tree": ROOT}
        figures = {name: [] for name in roots}
        for r in range(args.rounds):
            for name in list(roots) if r % 2 == 0 else list(roots)[::-1]:
                figures[name].append(engine_round(roots[name], args.clients, args.model, args.backend or "torch"))
        report(f"bare engine, backend {args.backend or 'torch'}, {args.clients} streams of 256 characters, {args.rounds} rounds alternated", figures)
        return
    roots = {"baseline": Path(args.baseline).resolve(), "this tree": ROOT}
    builds: dict[str, Proc] = {}
    figures = {name: [] for name in roots}
    ttft = {name: [] for name in roots}
    try:
        for name, root in roots.items():
            builds[name] = build(root, args.model, args.threads, args.quantize, args.backend)  # returns once its /ready answers
        for r in range(args.rounds):
            for name in list(builds) if r % 2 == 0 else list(builds)[::-1]:
                out = loadgen(builds[name].url, args.clients, args.seconds, prompt=args.prompt)
                figures[name].append(out["chars_per_s"])
                ttft[name].append(out["ttft_p50"] * 1e3)
    finally:
        for proc in builds.values():
            proc.stop()
    report(f"/generate, backend {args.backend or 'the default'}, {args.clients} streaming clients, prompt {args.prompt!r}, {args.seconds:g} s a round, "
           f"{args.rounds} rounds alternated", figures)
    print("time to the first character, p50 of each round (ms): " +
          "; ".join(f"{name} {', '.join(f'{x:.1f}' for x in xs)}" for name, xs in ttft.items()))


def report(what: str, figures: dict[str, list[float]]) -> None:
    print(f"{what}; median characters per second")
    print(table(["build", "chars/s (median)", "rounds"],
                [[name, statistics.median(xs), ", ".join(f"{x:,.0f}" for x in xs)] for name, xs in figures.items()]))
    print(f"this tree / baseline: {statistics.median(figures['this tree']) / statistics.median(figures['baseline']):.3f}")


if __name__ == "__main__":
    main()
