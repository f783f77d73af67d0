"""Admission over real HTTP: a short request is not queued behind long prompts, a request with many choices
holds at most its share of rows while others are served beside it, and a request's work and answer size
have limits that a 4xx names, in each route's error shape."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse

from ..server import Server, wait_until

WORK = 20_000
ENTRIES = 5_000


@pytest.fixture(scope="module")
def bounded_server(trained_store):
    srv = Server(trained_store, max_batch_size=8, max_queue=8, max_request_work_chars=WORK, max_logprob_entries=ENTRIES,
                 prefill_chunk=64)  # rows_per_request: 2
    yield srv
    srv.stop()


async def first_token_at(client: httpx.AsyncClient, url: str, body: dict) -> float:
    """When the stream's first token event arrived (time.monotonic), after reading the stream to its end."""
    first = None
    async with aconnect_sse(client, "POST", url, json={**body, "stream": True}) as source:
        async for event in source.aiter_sse():
            if event.event == "token" and first is None:
                first = time.monotonic()
    assert first is not None
    return first


def test_a_short_request_writes_before_long_prompts_sent_ahead_of_it_are_ingested(server):
    long_prompt = ("KING:\nthou art my lord, and the night is sweet.\n" * 500)[:20_000]

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            longs = [asyncio.create_task(first_token_at(client, server.url + "/generate",
                                                        {"prompt": long_prompt, "max_new_tokens": 1, "seed": i}))
                     for i in range(8)]
            await asyncio.to_thread(wait_until, lambda: server.metric("charlstm_running_streams") >= 8
                                    or any(t.done() for t in longs), 30, "8 long prompts ingesting")
            short = await first_token_at(client, server.url + "/generate", {"prompt": "ROMEO: ", "max_new_tokens": 20, "seed": 1})
            return short, sorted(await asyncio.gather(*longs))

    short, longs = asyncio.run(scenario())
    # before the scheduler it wrote after all 8 (each loop's budget went to the head of the queue); now at
    # most the one long prompt being finished when it arrived can be ahead of it
    assert short < longs[1], f"the short request wrote after {sum(t < short for t in longs)} of the 8 long prompts"


def test_a_request_with_many_choices_holds_two_rows_while_another_request_is_served(bounded_server):
    srv = bounded_server

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            order, samples = [], []

            async def wide():
                async with client.stream("POST", srv.url + "/v1/completions", json={
                        "model": "tiny", "prompt": "KING:", "n": 8, "max_tokens": 2000, "stream": True, "seed": 1}) as r:
                    assert r.status_code == 200
                    finished = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            finished += sum(bool(c["finish_reason"]) for c in json.loads(line[6:])["choices"])
                            if finished < 6:  # the engine's count of rows in use, and whether the plain request is over
                                ready = (await client.get(srv.url + "/ready")).json()
                                samples.append(("plain" in order, ready["running"]))
                order.append("wide")
                return finished

            task = asyncio.create_task(wide())
            await asyncio.to_thread(wait_until, lambda: srv.metric("charlstm_running_streams") >= 2, 30, "the wide request running")
            r = await client.post(srv.url + "/generate", json={"prompt": "QUEEN:", "max_new_tokens": 5, "seed": 2})
            order.append("plain")
            assert r.status_code == 200
            return await task, order, samples

    finished, order, samples = asyncio.run(scenario())
    assert finished == 8
    assert order == ["plain", "wide"]  # served beside it, not after its 8 choices
    alone = [running for plain_over, running in samples if plain_over]
    assert alone and max(alone) == 2  # never more than max_rows_per_request of its choices at once
    assert max(running for _, running in samples) <= 3  # 2, and the plain request's row


def test_work_beyond_the_limit_gets_422_naming_it_on_each_route(bounded_server):
    srv = bounded_server
    api = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        api.completions.create(model="tiny", prompt="KING:\n" * 1000, n=4, max_tokens=10)  # 6,000 x 4 + 40
    assert e.value.code == "request_too_large" and f"max_request_work_chars={WORK}" in e.value.message
    r = httpx.post(srv.url + "/generate", json={"prompt": "KING:\n" * 3000, "max_new_tokens": 3000})  # 18,000 + 3,000
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "request_too_large" and f"max_request_work_chars={WORK}" in r.json()["error"]["message"]
    ok = api.completions.create(model="tiny", prompt="KING:\n" * 1000, n=3, max_tokens=10)  # 18,030: within
    assert len(ok.choices) == 3


def test_an_answer_beyond_the_logprob_limit_gets_422_naming_it(bounded_server):
    api = openai.OpenAI(base_url=bounded_server.url + "/v1", api_key="unused", max_retries=0)
    prompt = "KING:\nthou art my lord.\n" * 60  # 1,440 characters
    with pytest.raises(openai.UnprocessableEntityError) as e:  # 1,440 echoed x (1 + 5) = 8,640
        api.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    assert e.value.code == "request_too_large" and f"max_logprob_entries={ENTRIES}" in e.value.message
    ok = api.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)  # 2,880
    assert len(ok.choices[0].logprobs.token_logprobs) == len(prompt)
