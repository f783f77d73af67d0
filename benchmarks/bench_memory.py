"""Where a server's bytes go: resident memory after its imports, idle with one model on each backend and on
`auto`, after each further model, and at peak under 64 streaming clients; and, in one process, what each
stage of loading a model adds (the weights, the backend's build, what the allocator gives back).

    python -m benchmarks.bench_memory [--baseline DIR] [--backends onnx-int8,onnx,torch,torch-int8,auto]

Resident memory is VmRSS from /proc (VmHWM for the peak under load), of the server process alone. With
`--baseline DIR` (a checkout of an earlier build) every figure is measured for both builds, one after the
other. Each server gets a private session file and, where the build has one, a private backend-choice
cache, so `auto` measures at its first start (and once more with the cache warm).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .common import ROOT, Proc, loadgen, table, tree_server

MODELS = ["shakespeare@v1", "shakespeare@v2", "shakespeare@v3", "shakespeare@v4"]

STAGES = r"""
import ctypes, gc, json, sys, time
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
out = {"start": rss()}
import numpy, onnxruntime, onnx, fastapi, uvicorn
if sys.argv[1].startswith("torch"):
    import torch
out["imports"] = rss()
import service.server
out["server modules"] = rss()
from service.model import store
loaded = store.load("shakespeare@v4")
out["weights loaded"] = rss()
from service.backends import build
backend = build(sys.argv[1], loaded if hasattr(loaded, "tensors") else loaded.model)  # (an earlier build: the torch module)
out["backend built"] = rss()
gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
out["after malloc_trim"] = rss()
print(json.dumps(out))
"""


def rss_of(pid: int, field: str = "VmRSS") -> float:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith(field)) / 1024


def stages(tree: Path, backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STAGES, backend], cwd=tree, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tree), "CHARLSTM_MODEL_STORE": str(ROOT / "model_store"),
                              "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def server(tree: Path, backend: str, cache: Path | None = None, without_torch: bool = False, **env):
    """A server of `tree`; `without_torch`: as on the serving install (tests/without_torch: torch cannot be imported)."""
    extra = {"CHARLSTM_BACKEND_CACHE": str(cache)} if cache is not None else {}
    t0 = time.perf_counter()
    if without_torch:
        env = {**env, "PYTHONPATH": f"{ROOT / 'tests' / 'without_torch'}:{tree}"}
        proc = Proc(["-m", "service.cli", "serve", "--port", "{port}"], {
            "CHARLSTM_MODEL_STORE": str(ROOT / "model_store"), "CHARLSTM_LOG_LEVEL": "warning",
            "CHARLSTM_SESSION_DB": str(Path(tempfile.mkdtemp(prefix="charlstm-tree-")) / "sessions.sqlite3"),
            **({"CHARLSTM_BACKEND": backend} if backend != "auto" else {}), **extra, **env}, cwd=tree)
    else:
        proc = tree_server(tree, backend, **extra, **env)
    return proc, time.perf_counter() - t0


def idle(tree: Path, backend: str, without_torch: bool = False) -> tuple[float, float]:
    """(idle RSS with the default model, seconds from start to ready)."""
    proc, ready_s = server(tree, backend, Path(tempfile.mkdtemp(prefix="charlstm-mem-")) / "choices.json", without_torch)
    try:
        time.sleep(1.0)  # let the start's transient buffers go
        return rss_of(proc.proc.pid), ready_s
    finally:
        proc.stop()


def models_and_load(tree: Path, backend: str, clients: int, seconds: float) -> tuple[list[float], float]:
    """RSS after each model is loaded in turn (all four kept), then the peak under `clients` streams."""
    proc, _ = server(tree, backend, Path(tempfile.mkdtemp(prefix="charlstm-mem-")) / "choices.json",
                     CHARLSTM_MODELS="all", CHARLSTM_MAX_LOADED_MODELS="4")
    try:
        after = []
        for model in MODELS:
            r = httpx.post(proc.url + "/generate", json={"model": model, "prompt": "KING:\n", "max_new_tokens": 4}, timeout=300)
            r.raise_for_status()
            time.sleep(0.5)
            after.append(rss_of(proc.proc.pid))
        loadgen(proc.url, clients, seconds, max_new_tokens=256)
        return after, rss_of(proc.proc.pid, "VmHWM")
    finally:
        proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, default=None, help="a checkout of an earlier build, measured the same way")
    ap.add_argument("--backends", default="onnx-int8,onnx,torch,torch-int8,auto")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    builds = [("this build", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    backends = args.backends.split(",")
    rows, stage_rows, model_rows = [], [], []
    for label, tree in builds:
        for backend in [b for b in backends if b != "auto"]:
            s = stages(tree, backend)
            names = list(s)
            stage_rows.append([label, backend] + [f"{s[n]:.0f} (+{s[n] - s[names[i - 1]]:.0f})" if i else f"{s[n]:.0f}"
                                                  for i, n in enumerate(names)])
        for backend in backends:
            mb, ready_s = idle(tree, backend)
            rows.append([label, backend, f"{mb:.0f}", f"{ready_s:.1f}"])
        if tree == ROOT:  # the serving install: no torch to import (an earlier build needs it)
            for backend in [b for b in backends if not b.startswith("torch")]:
                mb, ready_s = idle(tree, backend, without_torch=True)
                rows.append([label, f"{backend}, serving install (no torch)", f"{mb:.0f}", f"{ready_s:.1f}"])
        if "auto" in backends:  # the second start finds the first one's choice (where the build keeps one)
            cache = Path(tempfile.mkdtemp(prefix="charlstm-mem-")) / "choices.json"
            for start in ("first start", "second start"):
                proc, ready_s = server(tree, "auto", cache)
                time.sleep(1.0)
                rows.append([label, f"auto, {start} on one cache", f"{rss_of(proc.proc.pid):.0f}", f"{ready_s:.1f}"])
                proc.stop()
        default = "auto" if "auto" in backends else backends[0]
        after, peak = models_and_load(tree, default, args.clients, args.seconds)
        model_rows.append([label, default] + [f"{m:.0f}" for m in after]
                          + [" / ".join(f"{b - a:.0f}" for a, b in zip(after, after[1:])), f"{peak:.0f}"])
    print("In one process, RSS MB after each stage (the increase in brackets):")
    print(table(["build", "backend", "start", "imports", "server modules", "weights", "backend built", "malloc_trim"],
                stage_rows))
    print("\nServers, idle with the default model (shakespeare@v4):")
    print(table(["build", "backend", "RSS MB", "start to ready s"], rows))
    print(f"\nOne server, --models all --max-loaded-models 4, each model loaded in turn, then {args.clients} clients:")
    print(table(["build", "backend", *[m.split("@")[1] for m in MODELS], "each further model MB", f"peak MB under {args.clients}"],
                model_rows))


if __name__ == "__main__":
    main()
