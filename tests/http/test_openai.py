"""The OpenAI-compatible API through the official `openai` client, and POST /score, against a real server."""

from __future__ import annotations

import asyncio
import json
import math
import signal

import httpx
import openai
import pytest

from service.training.evaluate import score_text

from ..conftest import make_play
from ..server import Server, wait_until

MODEL = "tiny@v1"


def client(srv, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def sse_data(raw: str) -> list[str]:
    return [line[len("data: "):] for line in raw.split("\n") if line.startswith("data: ")]


@pytest.fixture(scope="module")
def tight_server(trained_store):
    """An API key, one row and no queue, a small body limit: every refusal is one request away."""
    srv = Server(trained_store, api_key="k3y", max_batch_size=1, max_queue=0, max_body_bytes=4096,
                 max_new_tokens=1_000_000)
    yield srv
    srv.stop()


# ---------------------------------------------------------------- models and completions

def test_models_list_and_the_bare_name(server):
    api = client(server)
    models = api.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "charlstm"
    for name in (MODEL, "tiny"):
        assert api.completions.create(model=name, prompt="KING:", max_tokens=3).model == MODEL


def test_models_retrieve_by_any_name_a_request_takes(server):
    api = client(server)
    for name in (MODEL, "tiny"):  # a bare name: its newest version
        model = api.models.retrieve(name)
        assert model.id == MODEL and model.object == "model" and model.owned_by == "charlstm"
    with pytest.raises(openai.NotFoundError) as e:
        api.models.retrieve("nope@v9")
    assert e.value.code == "model_not_found" and "nope@v9" in e.value.message


def test_plain_completion_matches_generate_for_the_same_seed(server):
    r = client(server).completions.create(model=MODEL, prompt="KING:\n", max_tokens=40, seed=5, temperature=0.8, top_p=0.9)
    native = httpx.post(server.url + "/generate", json={"prompt": "KING:\n", "max_new_tokens": 40, "seed": 5,
                                                        "temperature": 0.8, "top_p": 0.9}).json()
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.text == native["text"] and len(choice.text) == 40 and choice.finish_reason == "length"
    assert choice.logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 40, 46)


def test_streamed_completion_equals_the_plain_one_and_ends_with_usage_and_done(server):
    api = client(server)
    plain = api.completions.create(model=MODEL, prompt="QUEEN:", max_tokens=60, seed=9)
    chunks = list(api.completions.create(model=MODEL, prompt="QUEEN:", max_tokens=60, seed=9, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 60
    assert all(c.id == chunks[0].id for c in chunks)
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": MODEL, "prompt": "A", "max_tokens": 5,
                                                                    "stream": True}, timeout=60) as r:
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n") and "\r" not in raw
    assert json.loads(sse_data(raw)[-2])["choices"][0]["finish_reason"] == "length"


def test_n_and_a_list_of_prompts(server):
    r = client(server).completions.create(model=MODEL, prompt=["KING:", "FOOL:"], n=3, max_tokens=20, seed=100)
    assert [c.index for c in r.choices] == list(range(6))
    assert all(len(c.text) == 20 for c in r.choices)
    assert len({c.text for c in r.choices[:3]}) == 3  # choice j of a prompt draws from seed + j
    for j, prompt in ((1, "KING:"), (2, "FOOL:")):
        native = httpx.post(server.url + "/generate", json={"prompt": prompt, "max_new_tokens": 20, "seed": 100 + j}).json()
        assert r.choices[3 * (prompt == "FOOL:") + j].text == native["text"]
    assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == 120
    streamed = list(client(server).completions.create(model=MODEL, prompt=["KING:", "FOOL:"], n=3, max_tokens=20, seed=100,
                                                      stream=True))
    for c in r.choices:
        assert "".join(k.choices[0].text for k in streamed if k.choices[0].index == c.index) == c.text


def test_logprobs_with_alternatives_agree_with_score(server):
    prompt = "KING:\nThou art"
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=30, seed=3, logprobs=3)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert lp.tokens == list(text) and lp.text_offset == list(range(len(text)))
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        assert 3 <= len(top) <= 4 and math.isclose(top[token], value, abs_tol=1e-9)  # the sampled one is always there
    scored = httpx.post(server.url + "/score", json={"text": prompt + text}).json()
    tail = scored["logprobs"][len(prompt) - 1:]  # /score starts at the second character
    assert len(tail) == len(text)
    assert tail == lp.token_logprobs  # scoring and generation take the same steps: the same bits


def test_a_score_is_a_property_of_the_text_not_of_its_length(server):
    """A character's figure in a context is the same however much text follows it, on /score and on echo."""
    short, long = "KING:", "KING:\nthou art my lord, and I thy servant.\n" * 3
    figures = [httpx.post(server.url + "/score", json={"text": t}).json()["logprobs"] for t in (short, long[:9], long)]
    assert figures[0] == figures[2][:4] and figures[1] == figures[2][:8]
    echoed = [client(server).completions.create(model=MODEL, prompt=t, max_tokens=1, echo=True, logprobs=0, seed=1)
              .choices[0].logprobs.token_logprobs for t in (short, long)]
    assert echoed[0][:5] == echoed[1][:5] and echoed[1][1:5] == figures[2][:4]


def test_echo_returns_the_prompt_with_its_logprobs(server):
    api = client(server)
    r = api.completions.create(model=MODEL, prompt="KING:", max_tokens=10, seed=1, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text.startswith("KING:") and len(choice.text) == 15
    lp = choice.logprobs
    assert lp.tokens == list(choice.text) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert lp.text_offset == list(range(15))
    plain = api.completions.create(model=MODEL, prompt="KING:", max_tokens=10, seed=1, echo=True)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None
    streamed = list(api.completions.create(model=MODEL, prompt="KING:", max_tokens=10, seed=1, echo=True, logprobs=2,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert sum((c.choices[0].logprobs.token_logprobs for c in streamed if c.choices[0].logprobs), []) == lp.token_logprobs


def test_echo_without_tokens_is_the_score_of_the_prompt(server, tiny_model):
    text = make_play(800, seed=5)
    r = client(server).completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0
    scored = httpx.post(server.url + "/score", json={"text": text}).json()
    assert lp.token_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], scored["logprobs"])) < 1e-6
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # logprobs 0: the character itself, no alternatives


def test_stop_strings(server):
    api = client(server)
    r = api.completions.create(model=MODEL, prompt="KING:\n", max_tokens=400, seed=2, stop=["\n", ":"])
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and "\n" not in choice.text and ":" not in choice.text
    full = api.completions.create(model=MODEL, prompt="KING:\n", max_tokens=400, seed=2).choices[0].text
    assert full.startswith(choice.text) and full[len(choice.text)] in "\n:"


def test_penalties_through_the_api(server):
    api = client(server)
    greedy = api.completions.create(model=MODEL, prompt="KING:", max_tokens=12, temperature=0)
    penalised = api.completions.create(model=MODEL, prompt="KING:", max_tokens=12, temperature=0, presence_penalty=2.0)
    assert len(set(greedy.choices[0].text)) < 12 and penalised.choices[0].text != greedy.choices[0].text
    zero = api.completions.create(model=MODEL, prompt="KING:", max_tokens=30, seed=4, presence_penalty=0.0,
                                  frequency_penalty=0.0, extra_body={"top_k": 0, "repetition_penalty": 1.0})
    assert zero.choices[0].text == api.completions.create(model=MODEL, prompt="KING:", max_tokens=30, seed=4).choices[0].text


def test_session_id_continues_a_native_session(server):
    session = httpx.post(server.url + "/sessions", json={"prompt": "KING:", "seed": 8}).json()
    twin = httpx.post(server.url + "/sessions", json={"prompt": "KING:", "seed": 8}).json()
    api = client(server)
    r = api.completions.create(model=MODEL, prompt="\n", max_tokens=15, extra_body={"session_id": session["session_id"]})
    native = httpx.post(f"{server.url}/sessions/{twin['session_id']}/generate", json={"prompt": "\n", "max_new_tokens": 15}).json()
    assert r.choices[0].text == native["text"]
    after = httpx.get(f"{server.url}/sessions/{session['session_id']}").json()
    assert after["position"] == session["position"] + 16
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model=MODEL, prompt="K", extra_body={"session_id": "no-such-session"})
    with pytest.raises(openai.BadRequestError) as e:  # one state cannot take several continuations
        api.completions.create(model=MODEL, prompt="K", n=2, extra_body={"session_id": session["session_id"]})
    assert e.value.param == "session_id"
    assert httpx.get(f"{server.url}/sessions/{session['session_id']}").json()["busy"] is False


# ---------------------------------------------------------------- errors as the client's typed exceptions

def test_bad_requests_raise_typed_errors(server):
    api = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=MODEL, prompt="KING", extra_body={"frobnicate": True})
    assert e.value.code == "unknown_field" and e.value.param == "frobnicate"
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=MODEL, prompt="KING", suffix="x")  # an OpenAI field this server does not take
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=MODEL, prompt="KING", logprobs=6)
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="gpt-4", prompt="KING")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        api.completions.create(model=MODEL, prompt="KING \u20ac")
    assert "U+20AC" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        api.completions.create(model=MODEL, prompt="KING", max_tokens=200_000)  # within the schema, above the setting
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_json")
    assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert set(httpx.get(server.url + "/nothing").json()["error"]) == {"type", "message", "param"}  # native shape elsewhere


def test_key_body_limit_and_overload_in_openai_shape(tight_server):
    srv = tight_server
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").models.list()
    assert_openai_error(httpx.get(srv.url + "/v1/models"), 401, "unauthorized")
    api = client(srv, key="k3y")
    assert api.models.list().data[0].id == MODEL
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "A" * 5000},
                   headers={"authorization": "Bearer k3y"})
    assert_openai_error(r, 413, "payload_too_large")

    async def saturated():
        async with httpx.AsyncClient(timeout=60, headers={"authorization": "Bearer k3y"}) as http:
            async with http.stream("POST", srv.url + "/v1/completions", json={
                    "model": MODEL, "prompt": "KING:", "max_tokens": 1_000_000, "stream": True}) as stream:
                lines = stream.aiter_lines()
                while not (await lines.__anext__()).startswith("data: "):
                    pass  # the one row is taken
                with pytest.raises(openai.RateLimitError) as e:
                    await asyncio.to_thread(api.completions.create, model=MODEL, prompt="A", max_tokens=2)
                assert e.value.response.headers["retry-after"] == "1" and e.value.code == "overloaded"
        await asyncio.to_thread(wait_until, lambda: srv.metric("charlstm_running_streams") == 0, 20, "row freed")

    asyncio.run(saturated())
    assert api.completions.create(model=MODEL, prompt="A", max_tokens=2).choices[0].finish_reason == "length"


def test_an_error_after_the_stream_began_is_a_data_chunk_then_done(trained_store):
    srv = Server(trained_store, shutdown_grace_s=0, max_new_tokens=1_000_000)
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json={"model": MODEL, "prompt": "KING:", "max_tokens": 1_000_000,
                                                                     "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            srv.proc.send_signal(signal.SIGTERM)
            rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    finally:
        srv.stop()
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "shutting_down"


# ---------------------------------------------------------------- POST /score

def test_score_agrees_with_evaluate(server, tiny_model):
    text = make_play(3000, seed=11)
    r = httpx.post(server.url + "/score", json={"text": text, "top_logprobs": 2}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    reference = score_text(tiny_model.model, tiny_model.vocab, text)
    assert body["chars"] == reference.chars == len(text) - 1 == len(body["logprobs"])
    assert abs(body["nats_per_char"] - reference.nats_per_char) < 1e-4
    assert math.isclose(body["bits_per_char"], body["nats_per_char"] / math.log(2))
    assert len(body["top_logprobs"]) == body["chars"]
    for top, lp in zip(body["top_logprobs"], body["logprobs"]):
        values = list(top.values())
        assert len(values) == 2 and values == sorted(values, reverse=True) and values[0] >= lp - 1e-6
    assert "top_logprobs" not in httpx.post(server.url + "/score", json={"text": "KING"}).json()


def test_score_after_a_session_counts_every_character_and_leaves_it(server):
    session = httpx.post(server.url + "/sessions", json={"prompt": "KING:\nThou"}).json()
    after = httpx.post(server.url + "/score", json={"text": " art", "session_id": session["session_id"]}).json()
    whole = httpx.post(server.url + "/score", json={"text": "KING:\nThou art"}).json()
    assert after["chars"] == 4
    assert max(abs(a - b) for a, b in zip(after["logprobs"], whole["logprobs"][-4:])) < 1e-4
    assert httpx.get(f"{server.url}/sessions/{session['session_id']}").json()["position"] == session["position"]
    r = httpx.post(server.url + "/score", json={"text": "K", "session_id": "missing"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "session_not_found"


def test_score_refusals(server):
    r = httpx.post(server.url + "/score", json={"text": "KING \u20ac and \u00e9"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "text"
    assert "U+20AC" in r.json()["error"]["message"] and "U+00E9" in r.json()["error"]["message"]
    limit = httpx.get(server.url + "/info").json()["limits"]["max_score_chars"]
    assert httpx.post(server.url + "/score", json={"text": "a" * (limit + 1)}).status_code in (413, 422)
    assert httpx.post(server.url + "/score", json={"text": "KING", "top_logprobs": 6}).status_code == 422
    assert httpx.post(server.url + "/score", json={"text": "KING", "extra": 1}).status_code == 422
    empty = httpx.post(server.url + "/score", json={"text": "K"}).json()
    assert empty == {"chars": 0, "nats_per_char": None, "bits_per_char": None, "logprobs": []}


HOSTILE_V1 = [
    b'{"model": "tiny", "prompt": "KING"',  # truncated
    b"\xff\xfe\x00garbage",  # not UTF-8
    b'{"model": "tiny", "prompt": "KING", "temperature": NaN}',
    b'{"model": "tiny", "prompt": "KING", "max_tokens": 1e400}',
    b'{"model": "tiny", "prompt": [1, "KING"]}',  # ids and text in one list
    b'{"model": "tiny", "prompt": [-1, 2]}',  # a negative token id
    b'{"model": "tiny", "prompt": [1.5]}',
    b'{"model": "tiny", "prompt": [[1], []], "n": 0}',
    b'{"model": "tiny", "prompt": "KING", "n": 0}',
    b'{"model": "tiny", "prompt": "KING", "stop": ["a", "b", "c", "d", "e"]}',
    b'{"model": "tiny", "prompt": "KING", "stream_options": {"include_usage": true, "extra": 1}}',
    b'{"model": "tiny"}',
    b"null",
    b"[]",
]


@pytest.mark.parametrize("body", HOSTILE_V1, ids=range(len(HOSTILE_V1)))
def test_hostile_bodies_on_v1_get_400_in_openai_shape(server, body):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
