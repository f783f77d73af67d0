"""A real server for the tests: `charlstm serve` in a subprocess on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.metrics import sample_sum

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WITHOUT_TORCH = Path(__file__).resolve().parent / "without_torch"  # its sitecustomize makes torch unimportable


class Server:
    def __init__(self, store_root: Path, model: str = "tiny", without_torch: bool = False, **settings):
        """without_torch: the serving install (torch cannot be imported in the server's interpreter)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", CHARLSTM_MODEL_STORE=str(store_root), CHARLSTM_MODEL=model,
                   CHARLSTM_TORCH_THREADS="1", CHARLSTM_LOG_LEVEL="warning",
                   CHARLSTM_BACKEND="torch")  # the in-process references are torch; tests of auto and of each backend say so
        if without_torch:
            env["PYTHONPATH"] = os.pathsep.join([str(WITHOUT_TORCH), *filter(None, [env.get("PYTHONPATH")])])
            env["CHARLSTM_BACKEND"] = "auto"
        tmp = Path(tempfile.mkdtemp(prefix="charlstm-test-"))
        settings.setdefault("session_db", tmp / "sessions.sqlite3")
        settings.setdefault("backend_cache", tmp / "backend-choices.json")  # auto measures at each test server's start
        settings.setdefault("drain_delay_s", 0)  # stopping a test server need not wait; test_lifecycle tests the delay
        settings.setdefault("session_create_burst", 1_000_000)  # every test client is one address; test_session_quotas sets its own
        env.update({f"CHARLSTM_{k.upper()}": str(v) for k, v in settings.items()})
        self.settings = settings
        self.log = open(tmp / "server.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling a probe, with a deadline: the wait is for a condition, not a duration
        raise RuntimeError(f"server not ready after {timeout}s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of the samples of `name` in /metrics whose labels include `labels` (service.metrics.sample_sum)."""
        key = self.settings.get("api_key")  # with a key set, /metrics needs it too
        text = httpx.get(self.url + "/metrics", timeout=5.0, headers={"Authorization": f"Bearer {key}"} if key else None).text
        return sample_sum(text, name, labels)

    def rss_mb(self) -> float:
        """Resident memory of the server process."""
        return rss_mb(self.proc.pid)

    def maps(self, fragment: str) -> bool:
        """Whether a file whose path holds `fragment` is mapped into the server process (a loaded library)."""
        return fragment in Path(f"/proc/{self.proc.pid}/maps").read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def alone_and_in_a_crowd(url: str, body: dict, others: int) -> tuple[str, list[httpx.Response]]:
    """`body`'s text from /generate alone, then the responses of it sent again at once with `others` requests
    of seeds 0, 1, ... (the first response is body's): what a seed writes alone and under load."""
    alone = httpx.post(url + "/generate", json=body, timeout=60).json()["text"]

    async def crowd():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(client.post(url + "/generate", json=body),
                                        *(client.post(url + "/generate", json=dict(body, seed=i)) for i in range(others)))

    return alone, asyncio.run(crowd())


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
