"""Several models in one server: what a first request to an unloaded model costs, and how two busy models
share the cores.

    python -m benchmarks.bench_models [--backend torch] [--loads 7] [--clients 32] [--seconds 12] [--threads 2]

1. First use: a server of the bundled store's models with keep-alive 0 (a model unloads as soon as it is
   idle). Each round waits until shakespeare@v2 is unloaded, times a one-character /generate naming it
   (the load: weights read and checked, backend built, engine started), then times the same request
   again (loaded). p50 and p90 of both, and the server's own load histogram beside them.
2. Sharing: shakespeare@v2 and shakespeare@v3 (both 2 x 512, so equal work a character) with `clients`
   streaming clients each, two load generators at once; then each model alone with the same clients, and
   one model with both load generators' clients (the same client-side work as the side-by-side run), in one run. The ratio of the two models' chars/s says how fair the
   share of the cores is (1.0: equal); their sum against one model's says what a second engine costs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

import httpx

from .common import charlstm_server, loadgen, table

FIRST, SECOND = "shakespeare@v2", "shakespeare@v3"


def loaded(url: str, ref: str) -> bool:
    return next(m["loaded"] for m in httpx.get(url + "/info", timeout=10).json()["models"] if m["id"] == ref)


def timed_request(url: str, ref: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url + "/generate", json={"model": ref, "prompt": "ROMEO:", "max_new_tokens": 1}, timeout=120)
    r.raise_for_status()
    return time.perf_counter() - t0


def first_use(args) -> list[list]:
    srv = charlstm_server(args.threads, model=SECOND, models=f"{FIRST},{SECOND}", backend=args.backend, model_keep_alive_s=0)
    cold, warm = [], []
    try:
        for _ in range(args.loads):
            deadline = time.monotonic() + 60
            while loaded(srv.url, FIRST):  # polling the server's state with a deadline, not a fixed wait
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{FIRST} did not unload")
                time.sleep(0.05)
            cold.append(timed_request(srv.url, FIRST))
            warm.append(timed_request(srv.url, FIRST))
        series = {line.split(" ")[0]: float(line.split(" ")[1]) for line in httpx.get(srv.url + "/metrics").text.splitlines()
                  if line.startswith("charlstm_model_load_seconds_") and f'model="{FIRST}"' in line}
        load = series[f'charlstm_model_load_seconds_sum{{model="{FIRST}"}}'] / series[f'charlstm_model_load_seconds_count{{model="{FIRST}"}}']
    finally:
        srv.stop()
    q = lambda xs, p: statistics.quantiles(xs, n=10)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return [[f"first request, {FIRST} unloaded", 1000 * statistics.median(cold), 1000 * q(cold, 9), len(cold)],
            ["the same request, loaded", 1000 * statistics.median(warm), 1000 * q(warm, 9), len(warm)],
            ["the server's load histogram, mean", 1000 * load, "", len(cold)]]


def sharing(args) -> list[list]:
    srv = charlstm_server(args.threads, model=SECOND, models=f"{FIRST},{SECOND}", backend=args.backend,
                          max_batch_size=2 * args.clients, model_keep_alive_s=-1)
    rows = []
    try:
        timed_request(srv.url, FIRST)  # both loaded before anything is measured
        run = lambda ref, clients: loadgen(srv.url, clients, args.seconds, model=ref)  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda ref: run(ref, args.clients), [FIRST, SECOND])
        rows.append([f"{FIRST} beside {SECOND}", args.clients, a["chars_per_s"], a["ttft_p50"] * 1000, a["itl_p99"] * 1000])
        rows.append([f"{SECOND} beside {FIRST}", args.clients, b["chars_per_s"], b["ttft_p50"] * 1000, b["itl_p99"] * 1000])
        rows.append(["both together", 2 * args.clients, a["chars_per_s"] + b["chars_per_s"], "", ""])
        for ref, clients in ((FIRST, args.clients), (SECOND, args.clients)):
            alone = run(ref, clients)
            rows.append([f"{ref} alone", clients, alone["chars_per_s"], alone["ttft_p50"] * 1000, alone["itl_p99"] * 1000])
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the same two load generators, both on one model
            c, d = pool.map(lambda ref: run(ref, args.clients), [SECOND, SECOND])
        rows.append([f"{SECOND} alone, from both load generators", 2 * args.clients, c["chars_per_s"] + d["chars_per_s"],
                     c["ttft_p50"] * 1000, c["itl_p99"] * 1000])
        rows.append([f"ratio {FIRST} / {SECOND} side by side", "", a["chars_per_s"] / b["chars_per_s"], "", ""])
    finally:
        srv.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="torch", help="a named backend (auto measures every backend at each load)")
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"backend {args.backend}, {args.threads} torch threads")
    print(table(["first use", "p50 ms", "p90 ms", "n"], first_use(args)))
    print()
    print(table(["two models, one server", "clients", "chars/s", "ttft p50 ms", "itl p99 ms"], sharing(args)))


if __name__ == "__main__":
    main()
