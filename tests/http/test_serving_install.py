"""The serving install (`pip install charlstm`, no torch): a server whose interpreter cannot import torch
serves, chooses among the backends it has, and writes the full install's text, bit for bit, on the same
backend and seed; sessions move between the two; the commands that need torch say so."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from ..server import ROOT, WITHOUT_TORCH, Server

KEY = "serving-install-key-" + "k" * 32
ASKS = [  # plain, filtered and penalised sampling, logprobs, a stop string
    {"prompt": "KING:\n", "max_new_tokens": 120, "seed": 5},
    {"prompt": "ROMEO", "max_new_tokens": 80, "seed": 9, "temperature": 0.7, "top_k": 12, "top_p": 0.9,
     "repetition_penalty": 1.3, "logprobs": True},
    {"prompt": "", "max_new_tokens": 60, "seed": 2, "temperature": 0.0, "stop": ["\n\n"]},
]


def generate(srv: Server, body: dict) -> dict:
    r = httpx.post(srv.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module", params=["onnx-int8", "onnx"])
def pair(request, trained_store):
    """The same backend on the full install and on the serving install, with one session key."""
    full = Server(trained_store, backend=request.param, session_key=KEY, max_new_tokens=100_000)
    slim = Server(trained_store, backend=request.param, session_key=KEY, max_new_tokens=100_000, without_torch=True)
    yield full, slim
    full.stop()
    slim.stop()


def test_the_serving_install_writes_the_full_install_text_bit_for_bit(pair):
    full, slim = pair
    assert slim.maps("onnxruntime") and not slim.maps("libtorch")
    assert not slim.maps("onnx_cpp2py_export")  # the graphs were written in a child process: onnx is not imported
    answers = [(generate(full, body), generate(slim, body)) for body in ASKS]
    for a, b in answers:
        assert a == b  # text, log-probabilities, finish reason and usage: the numbers too, not only the characters
    assert all(a["text"] for a, _ in answers[:2]) and "logprobs" in answers[1][0]
    alone = generate(slim, ASKS[1])["text"]
    with httpx.Client(timeout=60) as client:  # under load: eight at once on the serving install
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda _: client.post(slim.url + "/generate", json=ASKS[1]).json()["text"], range(8)))
    assert texts == [alone] * 8


def test_a_session_moves_between_the_installs_and_continues_exactly(pair):
    full, slim = pair
    made = {srv: httpx.post(srv.url + "/sessions", json={"prompt": "KING:\n", "seed": 3}, timeout=30).json()
            for srv in (full, slim)}
    say = lambda srv, sid, n: httpx.post(f"{srv.url}/sessions/{sid}/generate", json={"max_new_tokens": n},  # noqa: E731
                                         timeout=60).json()["text"]
    assert say(full, made[full]["session_id"], 40) == say(slim, made[slim]["session_id"], 40)
    blob = httpx.get(f"{full.url}/sessions/{made[full]['session_id']}/export", timeout=30).json()
    moved = httpx.post(slim.url + "/sessions/import", json=blob, timeout=30)
    assert moved.status_code == 201, moved.text
    assert say(slim, moved.json()["session_id"], 50) == say(full, made[full]["session_id"], 50)


def test_auto_on_the_serving_install_chooses_among_the_backends_it_has(trained_store):
    srv = Server(trained_store, without_torch=True)
    try:
        engine = httpx.get(srv.url + "/info", timeout=10).json()["engine"]
        assert engine["backend"]["name"] in ("onnx", "onnx-int8")
        assert not srv.maps("libtorch")
        assert generate(srv, ASKS[0])["text"]
    finally:
        srv.stop()


def run_cli(*args: str, store) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(WITHOUT_TORCH), CHARLSTM_MODEL_STORE=str(store))
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_cli_samples_without_torch_and_says_which_commands_need_it(trained_store, tmp_path):
    sampled = run_cli("sample", "--model", "tiny", "--length", "40", "--seed", "4", store=trained_store)
    assert sampled.returncode == 0 and len(sampled.stdout.strip()) > 0, sampled.stderr
    trained = run_cli("evaluate", "--model", "tiny", "--text", str(ROOT / "README.md"), store=trained_store)
    assert trained.returncode == 2
    assert "needs torch" in trained.stderr and "charlstm[torch]" in trained.stderr
