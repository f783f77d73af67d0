"""Sessions memory, prompt ingestion, and training speed, each against its reference in one run.

    python -m benchmarks.bench_components [--model shakespeare] [--sessions 10000] [--text FILE]

4. Sessions: resident memory of a server holding N idle sessions against the same server with none.
5. Prompt ingestion: a 10,000-character prompt through the torch backend's `prefill`, whole and in the
   engine's 512-character slices, against char by char through its step.
6. Training: `charlstm train` characters per second against a bare torch loop of the same model,
   batch and sequence length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from service.model import store
from service.backends.base import set_kernel_threads
from service.backends.torch_fp32 import TorchBackend
from service.model.network import CharLSTM, cross_entropy

from tests.server import rss_mb

from .common import ROOT, charlstm_server, table

SHARED_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def bench_sessions(model: str, count: int, threads: int) -> None:
    loaded = store.load(model)
    raw = loaded.config.state_floats() * 4
    srv = charlstm_server(threads, model=model, max_sessions=count + 10, max_queue=4096)
    try:
        httpx.post(srv.url + "/generate", json={"max_new_tokens": 20}, timeout=60)
        before = rss_mb(srv.proc.pid)

        async def create():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as http:
                sem = asyncio.Semaphore(32)

                async def one(i):
                    async with sem:
                        r = await http.post(srv.url + "/sessions", json={"prompt": "KING:", "seed": i})
                        assert r.status_code == 201, r.text

                await asyncio.gather(*(one(i) for i in range(count)))

        t0 = time.perf_counter()
        asyncio.run(create())
        elapsed = time.perf_counter() - t0
        after = rss_mb(srv.proc.pid)
        live = httpx.get(srv.url + "/metrics").text
        assert f"charlstm_live_sessions {count}.0" in live, "sessions missing"
    finally:
        srv.stop()
    per = (after - before) * 1024 * 1024 / count
    print(f"4. Sessions ({count:,} idle sessions, created in {elapsed:.1f} s)")
    print(table(["", "value"], [["RSS with none (MB)", before], ["RSS with sessions (MB)", after],
                                ["bytes per session", per], ["raw state bytes", float(raw)],
                                ["target: 2 x raw + 1 KB", float(2 * raw + 1024)], ["per session / target", per / (2 * raw + 1024)]]))


def bench_prefill(model: str, chars: int = 10_000) -> None:
    loaded = store.load(model)
    runner = TorchBackend(loaded)
    text = (SHARED_CORPUS.read_text()[:chars] if SHARED_CORPUS.exists() else "KING:\nthe " * (chars // 10 + 1))[:chars]
    ids = loaded.vocab.encode(text)
    zero = runner.zero_state()
    best_slices, best_one, best_steps = float("inf"), float("inf"), float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        state = zero
        for i in range(0, len(ids), 512):  # the engine's default slice
            state = runner.prefill(ids[i : i + 512], state)
        best_slices = min(best_slices, time.perf_counter() - t0)
        t0 = time.perf_counter()
        runner.prefill(ids, zero)
        best_one = min(best_one, time.perf_counter() - t0)
    t0 = time.perf_counter()
    s = zero[:, :, None]  # (2, L, 1, H)
    for i in ids:
        s = runner.step(np.array([i], dtype=np.int64), s)
    best_steps = time.perf_counter() - t0
    np.testing.assert_allclose(state, s[:, :, 0], rtol=1e-4, atol=1e-4)
    print(f"5. Prompt ingestion ({len(ids):,} characters)")
    print(table(["method", "chars/s", "x char by char"], [
        ["one call", len(ids) / best_one, best_steps / best_one],
        ["512-char slices (engine)", len(ids) / best_slices, best_steps / best_slices],
        ["char by char (fused step)", len(ids) / best_steps, 1.0]]))


def bench_training(text: Path, threads: int, steps: int) -> None:
    """Same model, batch and sequence length: the CLI trainer against a bare loop."""
    hp = dict(embed_dim=512, hidden_size=512, num_layers=2, dropout=0.4, embed_dropout=0.1, tie_weights=True,
              batch_size=64, seq_len=128)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "service.cli", "--store", f"{tmp}/store", "train", "--text", str(text),
               "--out", f"{tmp}/run", "--steps", str(steps), "--eval-every", str(10 * steps), "--checkpoint-every",
               str(10 * steps), "--no-save", "--no-progress", "--threads", str(threads), "--warmup-steps", "5"]
        for k, v in hp.items():
            flag = "--" + k.replace("_", "-")
            cmd += [flag] if v is True else [flag, str(v)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=3600)
        run = json.loads((Path(tmp) / "run" / "checkpoint.json").read_text())["run"]
        # The trainer's history row times its steps (data, forward, backward, clip, optimizer, progress
        # bar) up to the evaluation, which is left out for a like-for-like figure.
        cli_cps = run["history"][-1]["chars_per_s"]
    torch.set_num_threads(threads)
    from service.model.network import CharLSTMConfig

    text_ids = torch.randint(0, 65, (hp["batch_size"], hp["seq_len"] * (steps + 1) + 1))
    model = CharLSTM(CharLSTMConfig(vocab_size=65, embed_dim=512, hidden_size=512, num_layers=2, dropout=0.4,
                                    embed_dropout=0.1, tie_weights=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state, T = None, hp["seq_len"]
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = text_ids[:, i * T : (i + 1) * T], text_ids[:, i * T + 1 : (i + 1) * T + 1]
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)
        loss = cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    bare_cps = steps * hp["batch_size"] * T / (time.perf_counter() - t0)
    print(f"6. Training (2 x 512 LSTM, batch {hp['batch_size']}, seq {T}, {steps} steps, {threads} threads)")
    print(table(["loop", "chars/s", "vs bare"], [["charlstm train", cli_cps, cli_cps / bare_cps], ["bare torch loop", bare_cps, 1.0]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(SHARED_CORPUS), help="training text for part 6")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--only", default="4,5,6")
    args = ap.parse_args()
    set_kernel_threads(args.threads)  # torch's threads (loaded above) and every backend's
    parts = set(args.only.split(","))
    if "4" in parts:
        bench_sessions(args.model, args.sessions, args.threads)
        print()
    if "5" in parts:
        bench_prefill(args.model)
        print()
    if "6" in parts:
        bench_training(Path(args.text), args.threads, args.train_steps)


if __name__ == "__main__":
    main()
