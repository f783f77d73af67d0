"""Process-level behaviour: Prometheus-valid metrics, graceful shutdown on SIGTERM, a bad model at start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
from httpx_sse import connect_sse

from .server import ROOT, Server


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus; .ci/run installs it)")
def test_metrics_pass_promtool(server):
    httpx.post(server.url + "/generate", json={"max_new_tokens": 5})
    text = httpx.get(server.url + "/metrics").text
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sigterm_drains_running_streams_then_exits(trained_store):
    srv = Server(trained_store, shutdown_grace_s=1.0, max_new_tokens=1_000_000)
    try:
        with httpx.Client(timeout=60) as client:
            with connect_sse(client, "POST", srv.url + "/generate",
                             json={"prompt": "KING:", "max_new_tokens": 1_000_000, "stream": True}) as source:
                events = source.iter_sse()
                assert next(events).event == "token"
                srv.proc.send_signal(signal.SIGTERM)
                done = None
                for sse in events:
                    if sse.event == "done":
                        done = json.loads(sse.data)
        assert done is not None and done["finish_reason"] == "shutdown"
        assert done["usage"]["completion_tokens"] > 0
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly, so the exit is by that signal
        assert srv.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in srv.output()
    finally:
        srv.stop()


def test_a_missing_model_fails_at_start_with_one_clear_message(trained_store):
    env = dict(os.environ, CHARLSTM_MODEL_STORE=str(trained_store), CHARLSTM_MODEL="tiny@v9")
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown version 'v9' of model 'tiny'" in out.stderr and "Traceback" not in out.stderr
