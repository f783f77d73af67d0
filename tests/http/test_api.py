"""The service over real HTTP: a uvicorn server on loopback, the tiny model trained in this session."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse

from ..server import wait_until


def gen(server, **body) -> dict:
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, path="/generate", **body) -> tuple[list[dict], dict]:
    tokens, done = [], None
    with httpx.Client(timeout=60) as client:
        with connect_sse(client, "POST", server.url + path, json={**body, "stream": True}) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            for sse in source.iter_sse():
                if sse.event == "token":
                    tokens.append(json.loads(sse.data))
                elif sse.event == "done":
                    done = json.loads(sse.data)
    assert done is not None, "the stream ended without a done event"
    return tokens, done


def assert_error(r: httpx.Response, status: int, type_: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if type_:
        assert body["error"]["type"] == type_, body
    if param:
        assert body["error"]["param"] == param, body
    return body["error"]


# ---------------------------------------------------------------- probes and introspection

def test_health_ready_info(server, tiny_model):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    info = httpx.get(server.url + "/info").json()
    assert info["model"]["name"] == "tiny" and info["model"]["version"] == "v1"
    assert info["model"]["vocab"] == tiny_model.vocab.chars
    assert info["model"]["parameters"] == tiny_model.model.num_parameters()
    assert info["model"]["metrics"]["val_bits_per_char"] == tiny_model.card["metrics"]["val_bits_per_char"]
    assert info["limits"]["max_new_tokens"] == 100_000 and info["limits"]["max_batch_size"] == 64
    assert info["defaults"]["max_new_tokens"] == 256
    assert info["engine"]["quantize"] == "none" and info["engine"]["step_workers"] == 2  # fp32's default


def test_openapi_describes_every_route_and_field(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    for path in ("/generate", "/sessions", "/sessions/{session_id}/generate", "/sessions/{session_id}", "/health",
                 "/ready", "/info", "/metrics", "/admin/models/reload"):
        assert path in doc["paths"], path
    fields = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    assert set(fields) == {"model", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                           "stop", "stream", "logprobs", "unknown_chars", "replacement", "structured_outputs", "logit_bias"}
    assert fields["temperature"]["minimum"] == 0 and fields["top_p"]["maximum"] == 1
    assert fields["model"]["anyOf"][0]["enum"] == ["tiny", "tiny@v1"]  # the models served, by name and name@version
    assert httpx.get(server.url + "/docs").status_code == 200


# ---------------------------------------------------------------- generation

def test_generate_returns_text_usage_seed_and_model(server, tiny_model):
    out = gen(server, prompt="KING:\n", max_new_tokens=50, seed=5)
    assert len(out["text"]) == 50 and set(out["text"]) <= set(tiny_model.vocab.chars)
    assert out["finish_reason"] == "length" and out["seed"] == 5 and out["model"] == "tiny@v1"
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 50}
    assert gen(server, prompt="KING:\n", max_new_tokens=50, seed=5)["text"] == out["text"]
    assert gen(server, prompt="KING:\n", max_new_tokens=50, seed=6)["text"] != out["text"]
    random_seed = gen(server, prompt="", max_new_tokens=5)
    # an empty prompt on a fresh stream feeds the start character, and it counts as the one prompt token
    assert isinstance(random_seed["seed"], int) and random_seed["usage"]["prompt_tokens"] == 1
    assert gen(server, prompt="", max_new_tokens=5, seed=random_seed["seed"])["text"] == random_seed["text"]


def test_greedy_ignores_the_seed_and_filters_narrow_the_choice(server):
    a = gen(server, prompt="ROMEO:", max_new_tokens=40, temperature=0, seed=1)["text"]
    b = gen(server, prompt="ROMEO:", max_new_tokens=40, temperature=0, seed=2)["text"]
    assert a == b
    assert gen(server, prompt="ROMEO:", max_new_tokens=40, top_k=1, seed=3)["text"] == a
    assert gen(server, prompt="ROMEO:", max_new_tokens=40, top_p=1e-9, seed=4)["text"] == a
    penalised = gen(server, prompt="ROMEO:", max_new_tokens=40, temperature=0, repetition_penalty=5.0)["text"]
    assert penalised != a


def test_generate_matches_the_single_stream_reference(server, tiny_model):
    from ..reference import reference_text

    expected = "".join(reference_text(tiny_model.model, tiny_model.vocab, "JULIET:", 60, temperature=0.7, top_k=10, seed=21))
    assert gen(server, prompt="JULIET:", max_new_tokens=60, temperature=0.7, top_k=10, seed=21)["text"] == expected


def test_stream_equals_the_plain_response(server):
    body = dict(prompt="QUEEN:\n", max_new_tokens=120, temperature=0.9, top_p=0.95, seed=77)
    plain = gen(server, **body)
    tokens, done = stream(server, **body)
    assert "".join(t["text"] for t in tokens) == plain["text"]
    assert [t["index"] for t in tokens] == sorted(t["index"] for t in tokens) and tokens[0]["index"] == 0
    assert done["finish_reason"] == "length" and done["seed"] == 77 and done["usage"] == plain["usage"]


def test_stop_strings_end_the_text_and_are_not_included(server):
    full = gen(server, prompt="FOOL:\n", max_new_tokens=200, seed=9)["text"]
    stop = full[60:63]
    expected = full[: full.find(stop)]
    out = gen(server, prompt="FOOL:\n", max_new_tokens=200, seed=9, stop=["never there", stop])
    assert out["text"] == expected and out["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(expected) + len(stop)
    tokens, done = stream(server, prompt="FOOL:\n", max_new_tokens=200, seed=9, stop=[stop])
    assert "".join(t["text"] for t in tokens) == expected and done["finish_reason"] == "stop"


def test_logprobs_per_character(server):
    out = gen(server, prompt="KING:", max_new_tokens=30, seed=2, logprobs=True)
    assert len(out["logprobs"]) == 30 and all(lp <= 0.0 for lp in out["logprobs"])
    greedy = gen(server, prompt="KING:", max_new_tokens=30, temperature=0, logprobs=True)
    assert sum(greedy["logprobs"]) > sum(out["logprobs"])  # the argmax path is the likeliest
    tokens, _ = stream(server, prompt="KING:", max_new_tokens=30, seed=2, logprobs=True)
    assert [lp for t in tokens for lp in t["logprobs"]] == pytest.approx(out["logprobs"])


def test_same_seed_same_text_alone_or_batched_with_63_others(server):
    body = dict(prompt="GHOST:\n", max_new_tokens=80, temperature=1.0, seed=4242)
    alone = gen(server, **body)["text"]

    async def crowd():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            others = [client.post(server.url + "/generate", json=dict(body, seed=i, prompt=["KING:", "QUEEN:", "FOOL:", ""][i % 4]))
                      for i in range(63)]
            mine = client.post(server.url + "/generate", json=body)
            return await asyncio.gather(mine, *others)

    responses = asyncio.run(crowd())
    assert all(r.status_code == 200 for r in responses)
    assert responses[0].json()["text"] == alone
    assert len({r.json()["text"] for r in responses}) > 50  # the others really were different streams
    # the batch really held many streams at once
    assert server.metric("charlstm_batch_size_bucket", 'le="16.0"') < server.metric("charlstm_batch_size_count")


def test_empty_and_zero_length_generations(server):
    out = gen(server, prompt="KING", max_new_tokens=0)
    assert out["text"] == "" and out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0


# ---------------------------------------------------------------- sessions

def new_session(server, **body) -> dict:
    r = httpx.post(server.url + "/sessions", json=body, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def test_session_continuation_equals_one_long_call(server):
    a = new_session(server, prompt="ROMEO:\n", seed=31)
    b = new_session(server, prompt="ROMEO:\n", seed=31)
    assert a["position"] == 7 and a["session_id"] != b["session_id"] and len(a["session_id"]) >= 32
    first = httpx.post(f"{server.url}/sessions/{a['session_id']}/generate", json={"max_new_tokens": 100}).json()
    second = httpx.post(f"{server.url}/sessions/{a['session_id']}/generate", json={"max_new_tokens": 100}).json()
    whole = httpx.post(f"{server.url}/sessions/{b['session_id']}/generate", json={"max_new_tokens": 200}).json()
    assert first["text"] + second["text"] == whole["text"]
    assert second["session"]["position"] == 207 == whole["session"]["position"]
    meta = httpx.get(f"{server.url}/sessions/{a['session_id']}").json()
    assert meta["position"] == 207 and meta["seed"] == 31 and meta["busy"] is False


def test_session_prompt_is_fed_after_the_state_and_streams(server):
    a = new_session(server, prompt="KING:", seed=3)
    b = new_session(server, prompt="", seed=3)
    one = httpx.post(f"{server.url}/sessions/{a['session_id']}/generate", json={"prompt": " thou", "max_new_tokens": 40}).json()
    httpx.post(f"{server.url}/sessions/{b['session_id']}/generate", json={"prompt": "KING:", "max_new_tokens": 0})
    tokens, done = stream(server, f"/sessions/{b['session_id']}/generate", prompt=" thou", max_new_tokens=40)
    # b was primed with "\n" (an empty first prompt) before "KING:", so its state differs from a's
    assert done["session"]["position"] == 1 + 5 + 5 + 40
    c = new_session(server, prompt="KING:", seed=3)
    tokens, done = stream(server, f"/sessions/{c['session_id']}/generate", prompt=" thou", max_new_tokens=40)
    assert "".join(t["text"] for t in tokens) == one["text"]


def test_concurrent_calls_on_one_session_get_409_and_do_not_interleave(server):
    s = new_session(server, prompt="KING:", seed=8)
    sid = s["session_id"]
    url = f"{server.url}/sessions/{sid}/generate"
    with httpx.Client(timeout=60) as client:
        with connect_sse(client, "POST", url, json={"max_new_tokens": 100_000, "stream": True}) as source:
            events = source.iter_sse()
            assert next(events).event == "token"  # the first call holds the session now
            r = httpx.post(url, json={"max_new_tokens": 5})
            assert_error(r, 409, "session_busy")
            assert_error(httpx.delete(f"{server.url}/sessions/{sid}"), 409, "session_busy")
    # the first client went away: its call is cancelled and leaves the session as it was
    wait_until(lambda: not httpx.get(f"{server.url}/sessions/{sid}").json()["busy"], what="session release")
    assert httpx.get(f"{server.url}/sessions/{sid}").json()["position"] == 5
    twin = new_session(server, prompt="KING:", seed=8)
    mine = httpx.post(url, json={"max_new_tokens": 30}).json()["text"]
    theirs = httpx.post(f"{server.url}/sessions/{twin['session_id']}/generate", json={"max_new_tokens": 30}).json()["text"]
    assert mine == theirs


def test_session_delete_and_unknown(server):
    sid = new_session(server)["session_id"]
    assert httpx.delete(f"{server.url}/sessions/{sid}").status_code == 204
    assert_error(httpx.get(f"{server.url}/sessions/{sid}"), 404, "session_not_found")
    assert_error(httpx.delete(f"{server.url}/sessions/{sid}"), 404)
    assert_error(httpx.post(f"{server.url}/sessions/nope/generate", json={}), 404, "session_not_found")


def test_session_expires_after_its_ttl(server):
    sid = new_session(server, ttl_seconds=1)["session_id"]
    before = server.metric("charlstm_session_removals_total", 'reason="expired"')
    wait_until(lambda: httpx.get(f"{server.url}/sessions/{sid}").status_code == 404, what="expiry")
    assert server.metric("charlstm_session_removals_total", 'reason="expired"') == before + 1
    assert_error(httpx.post(f"{server.url}/sessions", json={"ttl_seconds": 10**6}), 422, param="ttl_seconds")


def test_least_recently_used_idle_session_is_evicted_at_the_cap(small_server):
    ids = [new_session(small_server, seed=i)["session_id"] for i in range(3)]
    httpx.get(f"{small_server.url}/sessions/{ids[0]}")  # reading does not count as use
    httpx.post(f"{small_server.url}/sessions/{ids[0]}/generate", json={"max_new_tokens": 1})  # a call does
    before = small_server.metric("charlstm_session_removals_total", 'reason="evicted"')
    new_session(small_server)
    assert httpx.get(f"{small_server.url}/sessions/{ids[1]}").status_code == 404  # the least recently used
    assert httpx.get(f"{small_server.url}/sessions/{ids[0]}").status_code == 200
    assert small_server.metric("charlstm_session_removals_total", 'reason="evicted"') == before + 1
    assert small_server.metric("charlstm_live_sessions") == 3


# ---------------------------------------------------------------- load: 429 and disconnects

async def _open_stream(client, url, body):
    """Open a streaming request and wait for its first token; returns the open context and its events."""
    ctx = aconnect_sse(client, "POST", url, json={**body, "stream": True})
    source = await ctx.__aenter__()
    events = source.aiter_sse()  # keep it referenced: collecting it would close the response
    first = await events.__anext__()
    assert first.event == "token"
    return ctx, events


def test_disconnect_frees_the_slot_and_saturation_gets_429(small_server):
    srv = small_server
    long = {"prompt": "KING:", "max_new_tokens": 1_000_000}

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            disconnects = srv.metric("charlstm_client_disconnects_total")
            a, a_events = await _open_stream(client, srv.url + "/generate", long)
            b, b_events = await _open_stream(client, srv.url + "/generate", long)
            assert srv.metric("charlstm_running_streams") == 2
            queued = asyncio.ensure_future(client.post(srv.url + "/generate", json={"prompt": "A", "max_new_tokens": 3}))
            await asyncio.to_thread(wait_until, lambda: srv.metric("charlstm_waiting_streams") == 1, 20, "queued request")
            r = await client.post(srv.url + "/generate", json={"max_new_tokens": 3})
            err = assert_error(r, 429, "overloaded")
            assert r.headers["retry-after"] == "1" and "waiting" in err["message"]
            await a_events.aclose()
            await a.__aexit__(None, None, None)  # one client goes away
            done = await queued  # the freed row serves the queued request
            assert done.status_code == 200 and len(done.json()["text"]) == 3
            await asyncio.to_thread(wait_until, lambda: srv.metric("charlstm_client_disconnects_total") == disconnects + 1,
                                    20, "disconnect counted")
            await b_events.aclose()
            await b.__aexit__(None, None, None)
            await asyncio.to_thread(wait_until, lambda: srv.metric("charlstm_running_streams") == 0, 20, "rows freed")
            assert srv.metric("charlstm_rejected_requests_total", 'reason="overloaded"') >= 1

    asyncio.run(scenario())


def test_plain_request_disconnect_is_cancelled(small_server):
    srv = small_server
    before = srv.metric("charlstm_client_disconnects_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/generate", json={"max_new_tokens": 1_000_000}, timeout=httpx.Timeout(60, read=0.5))
    wait_until(lambda: srv.metric("charlstm_client_disconnects_total") == before + 1, what="cancellation")
    wait_until(lambda: srv.metric("charlstm_running_streams") == 0, what="row freed")


# ---------------------------------------------------------------- errors: one shape

def test_error_shapes(server, small_server):
    url = server.url
    assert_error(httpx.post(url + "/generate", content=b'{"prompt": ', headers={"content-type": "application/json"}), 400, "invalid_json")
    assert_error(httpx.post(url + "/generate", content=b"", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.get(url + "/nowhere"), 404, "not_found")
    assert_error(httpx.get(url + "/generate"), 405, "method_not_allowed")
    assert_error(httpx.post(url + "/generate", content=b"prompt=x", headers={"content-type": "text/plain"}), 415)
    assert_error(httpx.post(small_server.url + "/generate", json={"prompt": "a" * 5000}), 413, "payload_too_large")
    e = assert_error(httpx.post(url + "/generate", json={"temperature": -1}), 422, "invalid_field", "temperature")
    assert "0" in e["message"]
    e = assert_error(httpx.post(url + "/generate", json={"max_new_tokens": 100_001}), 422, param="max_new_tokens")
    assert "100000" in e["message"]
    assert_error(httpx.post(url + "/generate", json={"top_p": 0}), 422, param="top_p")
    assert_error(httpx.post(url + "/generate", json={"seed": -1}), 422, param="seed")
    assert_error(httpx.post(url + "/generate", json={"max_new_tokens": "5"}), 422, param="max_new_tokens")
    assert_error(httpx.post(url + "/generate", json={"prompt": 5}), 422, param="prompt")
    assert_error(httpx.post(url + "/generate", json={"colour": "red"}), 422, param="colour")
    assert_error(httpx.post(url + "/generate", json={"stop": ["x"] * 17}), 422, param="stop")
    assert_error(httpx.post(url + "/generate", json={"stop": [""]}), 422, param="stop.0")
    assert_error(httpx.post(url + "/generate", content=b'{"temperature": NaN}', headers={"content-type": "application/json"}), 422)
    assert_error(httpx.post(url + "/generate", content=b'[1, 2]', headers={"content-type": "application/json"}), 422)
    e = assert_error(httpx.post(url + "/generate", json={"prompt": "KING: {é}"}), 422, "invalid_field", "prompt")
    assert "'{' (U+007B) at position 6" in e["message"] and "'é'" in e["message"]
    assert_error(httpx.post(url + "/generate", json={"prompt": "x" * 20_001}), 422, param="prompt")
    assert httpx.get(url + "/health").status_code == 200  # still serving


# ---------------------------------------------------------------- metrics

def test_metrics_count_what_happened(server):
    before_ok = server.metric("charlstm_requests_total", 'method="POST",route="/generate",status="200"')
    before_bad = server.metric("charlstm_requests_total", 'method="POST",route="/generate",status="422"')
    before_chars = server.metric("charlstm_generated_tokens_total")
    before_prompt = server.metric("charlstm_prompt_tokens_total")
    for _ in range(3):
        gen(server, prompt="KING", max_new_tokens=11)
    httpx.post(server.url + "/generate", json={"top_k": -1})
    assert server.metric("charlstm_requests_total", 'method="POST",route="/generate",status="200"') == before_ok + 3
    assert server.metric("charlstm_requests_total", 'method="POST",route="/generate",status="422"') == before_bad + 1
    assert server.metric("charlstm_generated_tokens_total") == before_chars + 33
    assert server.metric("charlstm_prompt_tokens_total") == before_prompt + 12
    text = httpx.get(server.url + "/metrics").text
    for name in ("charlstm_time_to_first_token_seconds_bucket", "charlstm_inter_token_latency_seconds_bucket",
                 "charlstm_queue_time_seconds_bucket", "charlstm_engine_step_duration_seconds_bucket",
                 "charlstm_request_duration_seconds_bucket", "charlstm_running_streams", "charlstm_waiting_streams",
                 "charlstm_live_sessions", 'charlstm_model_info{name="tiny"'):
        assert name in text, name
