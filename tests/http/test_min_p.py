"""min_p, a sampling control added after the controls got one source (service/sampling.py): the sampler keeps
only characters at least min_p times as likely as the most likely one, on the host and on the device sampler,
and every route and the command line take it, with its bounds."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import torch

from service.sampling import sample_next, softmax, uniforms

from ..server import ROOT

MODEL = "tiny@v1"


def controls(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return dict(temperature=np.full(B, temperature, np.float32), top_k=np.full(B, top_k, np.int64),
                top_p=np.full(B, top_p, np.float32), repetition_penalty=np.ones(B, np.float32),
                min_p=np.full(B, min_p, np.float32))


def test_min_p_keeps_only_characters_that_likely_and_leaves_other_rows_alone():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 12)).astype(np.float32)  # (B, V)
    u = uniforms(np.full(4000, 7), np.arange(4000))
    ids, _ = sample_next(logits, seen=None, u=u, **controls(4000, min_p=0.3))
    probs = softmax(logits)
    assert (probs[np.arange(4000), ids] >= 0.3 * probs.max(axis=1)).all()
    assert (ids != logits.argmax(axis=1)).mean() > 0.1  # not simply greedy
    greedy, _ = sample_next(logits, seen=None, u=u, **controls(4000, min_p=1.0))
    assert np.array_equal(greedy, logits.argmax(axis=1))
    # A row with min_p 0 draws what it draws with no min_p at all, beside rows that have one.
    mixed = controls(4000, min_p=0.0)
    mixed["min_p"][::2] = 0.5
    ids_mixed, _ = sample_next(logits, seen=None, u=u, **mixed)
    plain, _ = sample_next(logits, seen=None, u=u, **{k: v for k, v in controls(4000).items() if k != "min_p"})
    assert np.array_equal(ids_mixed[1::2], plain[1::2])


def test_the_device_form_of_the_sampler_picks_what_the_host_form_picks_with_min_p():
    rng = np.random.default_rng(1)
    B, V = 300, 30
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    c = controls(B, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    c["min_p"] = rng.uniform(0, 0.6, B).astype(np.float32)
    c["top_k"][::3] = 8
    u = uniforms(np.arange(B), np.zeros(B, np.int64))
    host, _ = sample_next(logits, seen=None, u=u, **c)
    t = {k: torch.from_numpy(v) for k, v in c.items()}
    device, _ = sample_next(torch.from_numpy(logits), t["temperature"], t["top_k"], t["top_p"], t["repetition_penalty"],
                            torch.zeros(B, V, dtype=torch.bool), torch.from_numpy(u), min_p=t["min_p"], branch_free=True)
    assert np.array_equal(device.numpy(), host)


def test_every_route_takes_min_p_and_min_p_one_is_greedy(server, chat_server):
    """min_p = 1 keeps the most likely character alone: the greedy text, on every route."""
    def generate(url, body):
        r = httpx.post(server.url + url, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    greedy = generate("/generate", {"prompt": "KING", "max_new_tokens": 40, "temperature": 0})
    assert generate("/generate", {"prompt": "KING", "max_new_tokens": 40, "min_p": 1.0, "seed": 5}) == greedy
    sid = httpx.post(server.url + "/sessions", json={"prompt": "KING"}, timeout=30).json()["session_id"]
    assert generate(f"/sessions/{sid}/generate", {"max_new_tokens": 40, "min_p": 1.0}) == greedy
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    done = api.completions.create(model=MODEL, prompt="KING", max_tokens=40, seed=5, extra_body={"min_p": 1.0})
    assert done.choices[0].text == greedy
    api = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)  # speakers the model can write
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "KING"}], max_tokens=30, seed=5,
                                       extra_body={"min_p": 1.0})
    chat_greedy = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "KING"}], max_tokens=30,
                                              temperature=0)
    assert chat.choices[0].message.content == chat_greedy.choices[0].message.content
    # A seed gives one text with min_p, whether the request runs alone or beside others.
    body = {"prompt": "KING", "max_new_tokens": 60, "min_p": 0.2, "seed": 9, "temperature": 1.3}
    alone = generate("/generate", body)
    with httpx.Client(timeout=60) as client:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(lambda _: client.post(server.url + "/generate", json=body).json()["text"], range(6)))
    assert texts == [alone] * 6
    assert httpx.get(server.url + "/info", timeout=10).json()["defaults"]["min_p"] == 0.0


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5"])
def test_min_p_out_of_bounds_is_a_clear_4xx_on_every_protocol(server, value):
    r = httpx.post(server.url + "/generate", json={"min_p": value}, timeout=30)
    assert r.status_code == 422 and "min_p" in r.text
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=MODEL, prompt="KING", max_tokens=4, extra_body={"min_p": value})
    assert "min_p" in str(e.value)


def test_the_cli_takes_min_p_with_the_servers_bounds(trained_store):
    env = dict(os.environ, CHARLSTM_MODEL_STORE=str(trained_store))

    def sample(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", "sample", "--model", "tiny", "--prompt", "KING",
                               "--length", "40", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    greedy, one = sample("--temperature", "0"), sample("--min-p", "1", "--seed", "3")
    assert greedy.returncode == one.returncode == 0 and greedy.stdout == one.stdout
    wrong = sample("--min-p", "1.5")
    assert wrong.returncode == 2 and "--min-p must be >= 0 and <= 1" in wrong.stderr
