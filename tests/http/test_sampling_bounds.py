"""Degenerate sampling values: a temperature below the floor samples greedily, penalties outside their
bounds are refused, and no row's distribution is ever non-finite, through the engine and on every route."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from service import sampling
from service.engine.engine import EngineConfig
from service.engine.types import Done, GenerationRequest
from service.sampling import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, MIN_TEMPERATURE, SamplingParams

from ..unit.test_engine import run_engine
from .test_openai import MODEL, client

EXTREMES = [dict(temperature=t) for t in (1e-40, 1e-12, MIN_TEMPERATURE / 2, MIN_TEMPERATURE, 1e-4, 100.0)] + [
    dict(temperature=1e-4, repetition_penalty=MIN_REPETITION_PENALTY),
    dict(temperature=1e-4, repetition_penalty=MAX_REPETITION_PENALTY),
    dict(temperature=MIN_TEMPERATURE, repetition_penalty=MIN_REPETITION_PENALTY, presence_penalty=-2.0, frequency_penalty=-2.0),
    dict(temperature=MIN_TEMPERATURE, presence_penalty=2.0, frequency_penalty=2.0, top_p=1e-9),
    dict(temperature=1e-40, top_k=3, repetition_penalty=MIN_REPETITION_PENALTY),
]


def test_no_row_ever_draws_from_a_non_finite_distribution(tiny_model, monkeypatch):
    """A spy on the one function every draw goes through: each row's probabilities are finite with mass."""
    draw, seen = sampling._draw, []

    def checked(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
        seen.append(probs.shape[0])
        assert np.isfinite(probs).all() and (probs.sum(axis=-1) > 0).all(), probs
        return draw(probs, u)

    monkeypatch.setattr(sampling, "_draw", checked)
    prompt = tiny_model.vocab.encode("KING:\n")
    requests = [GenerationRequest(prompt_ids=prompt, max_new_tokens=40, params=SamplingParams(**p), seed=i, logprobs=True)
                for i, p in enumerate(EXTREMES)]
    greedy = GenerationRequest(prompt_ids=prompt, max_new_tokens=40, params=SamplingParams(temperature=0), seed=99)
    events, _ = run_engine(tiny_model, EngineConfig(max_batch_size=16), requests + [greedy])
    done = {i: next(e for e in evs if isinstance(e, Done)) for i, evs in events.items()}
    assert seen and all(d.finish_reason == "length" for d in done.values())
    assert all(math.isfinite(lp) for d in done.values() for lp in d.logprobs or ())
    below_floor = [i for i, p in enumerate(EXTREMES) if p["temperature"] < MIN_TEMPERATURE and len(p) == 1]
    assert below_floor and all(done[i].text == done[len(EXTREMES)].text for i in below_floor)
    last = tiny_model.vocab.chars[-1]
    assert all(set(d.text) != {last} for d in done.values())  # the NaN distribution's signature


@pytest.fixture(scope="module")
def session_id(server):
    r = httpx.post(server.url + "/sessions", json={"prompt": "KING:\n"}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def test_every_route_samples_greedily_below_the_floor(server, session_id):
    api = client(server)
    native = lambda path, t: httpx.post(server.url + path, json={"prompt": "QUEEN:\n", "max_new_tokens": 30, "temperature": t,  # noqa: E731
                                                                 "seed": 1}, timeout=30).json()["text"]
    assert native("/generate", 1e-40) == native("/generate", 0)
    completions = [api.completions.create(model=MODEL, prompt="QUEEN:\n", max_tokens=30, temperature=t, seed=1).choices[0].text
                   for t in (1e-40, 0)]
    chats = [api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Good day."}], max_tokens=30,
                                         temperature=t, seed=1, extra_body={"speakers": {"user": "KING"}}).choices[0].message.content
             for t in (1e-40, 0)]
    assert completions[0] == completions[1] and chats[0] == chats[1]
    # a session call below the floor writes what a fresh greedy stream from the same state writes
    forked = httpx.post(f"{server.url}/sessions/{session_id}/fork", json={}, timeout=30).json()["session_id"]
    texts = [httpx.post(f"{server.url}/sessions/{sid}/generate", json={"max_new_tokens": 30, "temperature": t}, timeout=30).json()["text"]
             for sid, t in ((session_id, 1e-40), (forked, 0))]
    assert texts[0] == texts[1]


@pytest.mark.parametrize("penalty", [1e-40, MIN_REPETITION_PENALTY / 2, MAX_REPETITION_PENALTY * 2])
def test_every_route_refuses_a_repetition_penalty_out_of_bounds(server, session_id, penalty):
    body = {"prompt": "QUEEN:\n", "max_new_tokens": 5, "repetition_penalty": penalty}
    for path in ("/generate", f"/sessions/{session_id}/generate"):
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 422 and "repetition_penalty" in r.text, r.text
    for path, extra in (("/v1/completions", {"prompt": "QUEEN:\n"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Good day."}]})):
        r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 5, "repetition_penalty": penalty, **extra}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty", r.text
