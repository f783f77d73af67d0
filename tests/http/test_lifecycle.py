"""Process-level behaviour: Prometheus-valid metrics, graceful shutdown on SIGTERM, a bad model at start."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from ..server import ROOT, Server, free_port, wait_until


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus; .ci/run installs it)")
def test_metrics_pass_promtool(server):
    httpx.post(server.url + "/generate", json={"max_new_tokens": 5})
    text = httpx.get(server.url + "/metrics").text
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@contextlib.contextmanager
def sigterm_during_a_stream(srv: Server):
    """A long SSE stream; once its first token has arrived, SIGTERM to the server. Yields the stream's
    remaining events."""
    with httpx.Client(timeout=60) as client:
        with connect_sse(client, "POST", srv.url + "/generate",
                         json={"prompt": "KING:", "max_new_tokens": 1_000_000, "stream": True}) as source:
            events = source.iter_sse()
            assert next(events).event == "token"
            srv.proc.send_signal(signal.SIGTERM)
            yield events


def test_sigterm_drains_running_streams_then_exits(trained_store):
    srv = Server(trained_store, shutdown_grace_s=1.0, max_new_tokens=1_000_000)
    try:
        with sigterm_during_a_stream(srv) as events:
            done = None
            for sse in events:
                if sse.event == "done":
                    done = json.loads(sse.data)
        assert done is not None and done["finish_reason"] == "shutdown"
        assert done["usage"]["completion_tokens"] > 0
        # a drained SIGTERM is a clean stop: exit status 0
        assert srv.proc.wait(timeout=30) == 0
        assert "Traceback" not in srv.output()
    finally:
        srv.stop()


def test_a_missing_model_fails_at_start_with_one_clear_message(trained_store):
    env = dict(os.environ, CHARLSTM_MODEL_STORE=str(trained_store), CHARLSTM_MODEL="tiny@v9")
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown version 'v9' of model 'tiny'" in out.stderr and "Traceback" not in out.stderr


def test_sigterm_keeps_accepting_during_the_drain_delay_with_ready_503_then_closes_and_exits_0(trained_store):
    srv = Server(trained_store, drain_delay_s=4.0, shutdown_grace_s=1.0, max_new_tokens=1_000_000)
    try:
        with sigterm_during_a_stream(srv) as events:
            # each probe is a NEW connection: during the delay it is accepted and told 503, never refused
            wait_until(lambda: httpx.get(srv.url + "/ready", timeout=5).status_code == 503, what="/ready 503")
            ready = httpx.get(srv.url + "/ready", timeout=5)
            assert ready.status_code == 503 and ready.json()["error"]["type"] == "not_ready"
            assert "shutting down" in ready.json()["error"]["message"]
            refused = httpx.post(srv.url + "/generate", json={"max_new_tokens": 5}, timeout=5)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            assert "Retry-After" in refused.headers
            # the stream that was running goes on during the delay
            tokens_after_probes = 0
            for sse in events:
                if sse.event == "token":
                    tokens_after_probes += 1
                if sse.event == "done":
                    done = json.loads(sse.data)
                    break
        assert tokens_after_probes > 0
        assert done["finish_reason"] == "shutdown"
        # after the delay the port closes (connection refused) and the process ends cleanly
        wait_until(lambda: _refused(srv.url + "/health"), timeout=30, what="the port to close")
        assert srv.proc.wait(timeout=30) == 0
        assert "Traceback" not in srv.output()
    finally:
        srv.stop()


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_make_serve_stops_cleanly_on_sigterm(trained_store, tmp_path):
    """`make serve` execs the server, so make's child is the server itself; a SIGTERM to it drains and exits 0,
    and make reports no "Terminated"."""
    if not (shutil.which("make") and (ROOT / ".venv" / ".installed").exists()):
        pytest.skip("needs make and the project's .venv (made by `make install`)")
    port = free_port()
    env = dict(os.environ, CHARLSTM_MODEL_STORE=str(trained_store), CHARLSTM_MODEL="tiny", CHARLSTM_PORT=str(port),
               CHARLSTM_SESSION_DB=str(tmp_path / "sessions.sqlite3"), CHARLSTM_DRAIN_DELAY_S="0", CHARLSTM_TORCH_THREADS="1")
    log = open(tmp_path / "make.log", "w+")
    make = subprocess.Popen(["make", "--no-print-directory", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def ready() -> bool:
            assert make.poll() is None, "make serve exited early"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=60, what="make serve to be ready")
        [child] = Path(f"/proc/{make.pid}/task/{make.pid}/children").read_text().split()
        assert "charlstm" in Path(f"/proc/{child}/cmdline").read_text()  # the server itself, no shell between
        os.kill(int(child), signal.SIGTERM)
        assert make.wait(timeout=30) == 0
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    log.seek(0)
    output = log.read()
    assert "Terminated" not in output and "make: ***" not in output, output
