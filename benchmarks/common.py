"""Shared by the benchmarks: start a server process on a free loopback port, run the load generator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.server import free_port

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """A server subprocess (Python by default, or `program`); ready when `probe` answers 200."""

    def __init__(self, args: list[str], env: dict | None = None, probe: str = "/ready", timeout: float = 120,
                 cwd: Path = ROOT, program: str = sys.executable, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="charlstm-bench-", suffix=".log", delete=False)
        full_env = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen([program, *[a.replace("{port}", str(self.port)) for a in args]],
                                     cwd=cwd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + probe, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def charlstm_server(threads: int, **settings) -> Proc:
    settings.setdefault("session_create_burst", 1_000_000)  # a load generator is one address: no per-client session quota
    env = {f"CHARLSTM_{k.upper()}": str(v) for k, v in settings.items()}
    env.update(CHARLSTM_TORCH_THREADS=str(threads), CHARLSTM_LOG_LEVEL="warning", CHARLSTM_SESSION_DB="",
               OMP_NUM_THREADS=str(threads))
    return Proc(["-m", "service.cli", "serve", "--port", "{port}"], env)


def tree_server(tree: Path, backend: str = "auto", command: tuple[str, ...] = ("-m", "service.cli", "serve"), **env) -> Proc:
    """`charlstm serve` (or `python <command>`, which takes its options) from a checkout's own sources (its
    `service` package shadows the installed one), default settings but for a private session file and `env`
    (CHARLSTM_* variables); `backend` named unless auto."""
    env = dict(CHARLSTM_MODEL_STORE=str(ROOT / "model_store"), CHARLSTM_LOG_LEVEL="warning", PYTHONPATH=str(tree),
               CHARLSTM_SESSION_DB=str(Path(tempfile.mkdtemp(prefix="charlstm-tree-")) / "sessions.sqlite3"), **env)
    if backend and backend != "auto":
        env["CHARLSTM_BACKEND"] = backend
    return Proc([*command, "--port", "{port}"], env, cwd=tree)


def run_json(args: list[str], timeout: float) -> dict:
    """`python <args>` in its own process (one OpenMP thread, as a load generator should take), its last
    line of output read as JSON."""
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def loadgen(url: str, clients: int, seconds: float, max_new_tokens: int = 256, warmup: float = 2.0, prompt: str = "\n",
            model: str | None = None) -> dict:
    """Run the load generator in its own process and return its JSON figures."""
    return run_json(["-m", "benchmarks.loadgen", "--url", url, "--clients", str(clients), "--seconds", str(seconds),
                     "--warmup", str(warmup), "--max-new-tokens", str(max_new_tokens), "--prompt", prompt,
                     *(["--model", model] if model else [])], timeout=seconds + warmup + 600)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[h for h in headers]] + [[f"{c:,.3g}" if isinstance(c, float) and abs(c) < 10 else
                                        f"{c:,.0f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
