"""Train shakespeare@v2 candidates on one GPU inside a fixed time budget, and keep the best (issue 17).

    python scripts/gpu/train_v2.py --text tinyshakespeare.txt --test-text macbeth.txt --store model_store \
        --work /tmp/v2 --budget-s 280

A device session is short and paid by the second, so the step count is not guessed: two probes of a
few dozen steps measure the step rate with one run alone and with every candidate side by side, and
the candidates then train in parallel when that costs each run less than 40% of its speed (else only
the first trains). Each run's cosine schedule is sized to end inside the budget. Every run exports
into its own copy of the store as the next version of `shakespeare`; the winner is the run with the
lowest validation + test (unseen play) nats/char, the rule the trainer itself selects checkpoints by.
A run that outlives its budget is ended with `--resume --finish`, which exports its best checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["--embed-dim", "512", "--hidden-size", "512", "--num-layers", "2", "--tie-weights",
          "--batch-size", "128", "--seq-len", "256", "--min-lr", "1e-4", "--warmup-steps", "200",
          "--device", "cuda", "--seed", "1337", "--no-progress"]
# The AWD-LSTM reference recipe (issue 17) and two more strongly regularised neighbours.
CANDIDATES = {
    "a": ["--dropout", "0", "--embed-dropout", "0.1", "--variational-dropout", "0.4", "--weight-drop", "0.3",
          "--lr", "3e-3", "--weight-decay", "0.1"],
    "b": ["--dropout", "0", "--embed-dropout", "0.1", "--variational-dropout", "0.5", "--weight-drop", "0.4",
          "--lr", "3e-3", "--weight-decay", "0.1"],
    "c": ["--dropout", "0.1", "--embed-dropout", "0.1", "--variational-dropout", "0.4", "--weight-drop", "0.5",
          "--lr", "3e-3", "--weight-decay", "0.2"],
    # second session: a's recipe with weight averaging, and a more strongly regularised one with it
    "d": ["--dropout", "0", "--embed-dropout", "0.1", "--variational-dropout", "0.4", "--weight-drop", "0.3",
          "--lr", "3e-3", "--weight-decay", "0.1", "--ema-decay", "0.999"],
    "e": ["--dropout", "0", "--embed-dropout", "0.1", "--variational-dropout", "0.5", "--weight-drop", "0.5",
          "--lr", "3e-3", "--weight-decay", "0.1", "--ema-decay", "0.999"],
    "f": ["--dropout", "0", "--embed-dropout", "0.1", "--variational-dropout", "0.45", "--weight-drop", "0.4",
          "--lr", "3e-3", "--weight-decay", "0.1", "--ema-decay", "0.999"],
}
PROBE_STEPS = 30


def train_cmd(args, key: str, out: Path, store: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "service.cli", "train", "--text", args.text, "--test-text", args.test_text,
            "--out", str(out), "--name", "shakespeare", "--store", str(store), *COMMON, *CANDIDATES[key], *args.extra.split(), *extra]


def probe(args, keys: list[str], work: Path) -> dict[str, float]:
    """Steps per second of each run while `keys` train side by side (training time only, from the checkpoint)."""
    procs = {}
    for k in keys:
        out = work / f"probe-{len(keys)}-{k}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = train_cmd(args, k, out, work / "probe-store", ["--steps", "100000", "--stop-at", str(PROBE_STEPS),
                                                              "--eval-every", "0", "--checkpoint-every", "0", "--no-save"])
        procs[k] = (subprocess.Popen(cmd), out)
    rates = {}
    for k, (p, out) in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"probe of candidate {k} failed (exit {p.returncode})")
        run = json.loads((out / "checkpoint.json").read_text())["run"]
        rates[k] = run["step"] / run["wall_time_s"]
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--test-text", required=True)
    ap.add_argument("--store", required=True, help="the store holding the models so far (copied per run)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--budget-s", type=float, default=280.0)
    ap.add_argument("--candidates", default="", help="comma-separated recipes to train side by side (default: a, or a,b,c when that is cheap)")
    ap.add_argument("--extra", default="", help="more train flags, after the recipe's (a CPU smoke run: smaller sizes, --device cpu)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "probe-store").mkdir(exist_ok=True)

    if args.candidates:  # these, side by side, whatever it costs each
        keys = args.candidates.split(",")
        alone, side_by_side = None, probe(args, keys, work)
    else:
        first = ["a", "b", "c"]
        alone = probe(args, first[:1], work)[first[0]]
        side_by_side = probe(args, first, work)
        keys = first if min(side_by_side.values()) >= 0.6 * alone else first[:1]
    rate = {k: (side_by_side[k] if len(keys) > 1 or alone is None else alone) for k in keys}
    print(json.dumps({"probe_steps_per_s_alone": alone, "probe_steps_per_s_side_by_side": side_by_side,
                      "candidates": keys}), flush=True)

    procs = {}
    t0 = time.monotonic()
    for k in keys:
        steps = int(rate[k] * args.budget_s * 0.95)  # the probe's rate includes warm-up: real runs go faster
        store = work / f"store-{k}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(args.store, store)
        out = work / f"run-{k}"
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--steps", str(steps), "--eval-every", str(max(50, steps // 40)), "--checkpoint-every", str(max(100, steps // 10))]
        log = open(work / f"run-{k}.log", "w")
        procs[k] = (subprocess.Popen(train_cmd(args, k, out, store, extra), stdout=log, stderr=subprocess.STDOUT), out, store)
    results = {}
    for k, (p, out, store) in procs.items():
        try:
            p.wait(timeout=max(1.0, args.budget_s + 30 - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            subprocess.run([sys.executable, "-m", "service.cli", "train", "--text", args.text, "--out", str(out),
                            "--store", str(store), "--resume", "--finish", "--no-progress"], check=False)
        result = out / "result.json"
        if result.is_file():
            results[k] = json.loads(result.read_text())
    if not results:
        raise SystemExit("no candidate finished")
    for k, r in results.items():
        print(f"candidate {k}: {json.dumps(r)}", flush=True)
    best = min(results, key=lambda k: results[k]["val_nats_per_char"] + results[k]["test_nats_per_char"])
    print(json.dumps({"winner": best, "wall_s": round(time.monotonic() - t0, 1)}), flush=True)
    (work / "winner").write_text(best)


if __name__ == "__main__":
    main()
