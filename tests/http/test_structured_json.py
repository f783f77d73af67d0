"""JSON replies from a model whose vocabulary has no brace, quote or most digits: `response_format`
(json_object, json_schema strict or not) on /v1, `structured_outputs.json` on /generate, with the official
client's `chat.completions.parse`, streaming, the same text alone and under load, and a clear 400 for
what cannot be served. The automaton writes the characters outside the vocabulary for the model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field

from service.engine.constraints import ANY_OBJECT, compile_json

from ..constraint_walk import random_text
from .test_openai import MODEL, client
from .test_protocols import post

MESSAGES = [{"role": "user", "content": "who comes here"}]


class Speech(BaseModel):
    speaker: Literal["KING", "QUEEN", "FOOL"]
    line: str = Field(max_length=40)
    count: int


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "lines": {
    "type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}}, "required": ["name", "lines"]}


def test_every_row_through_a_json_automaton_writes_json_its_schema_allows(tiny_model):
    chars = list(tiny_model.vocab.chars)
    assert not {'"', "{", "}", "[", "]", "0"} & set(chars)  # none of them can be drawn
    for schema in (PERSON, Speech.model_json_schema(), None):
        constraint = compile_json(schema, chars)
        assert constraint.prefix == "{"
        rng, finished = np.random.default_rng(0), 0
        for _ in range(100):
            text = random_text(constraint, chars, rng)
            if text is None:
                continue
            finished += 1
            jsonschema.validate(json.loads(text), ANY_OBJECT if schema is None else schema)
        assert finished >= 90


def test_json_object_replies_parse_for_every_seed(chat_server):
    api = client(chat_server)
    for seed in range(4):
        reply = api.chat.completions.create(model=MODEL, messages=MESSAGES, seed=seed, max_tokens=300,
                                            response_format={"type": "json_object"})
        content = reply.choices[0].message.content
        assert isinstance(json.loads(content), dict) and reply.choices[0].finish_reason == "stop", content
        # the model drew fewer characters than the reply holds: the braces and quotes were written for it
        assert reply.usage.completion_tokens < len(content)


def test_parse_with_a_pydantic_model_gives_a_valid_object_for_every_seed(chat_server):
    api = client(chat_server)
    for seed in range(4):
        reply = api.chat.completions.parse(model=MODEL, messages=MESSAGES, seed=seed, max_tokens=300,
                                           response_format=Speech)
        speech = reply.choices[0].message.parsed
        assert isinstance(speech, Speech), reply.choices[0].message.content
        assert Speech.model_validate_json(reply.choices[0].message.content) == speech


@pytest.mark.parametrize("strict", [True, False])
def test_streamed_json_schema_is_the_unstreamed_text_and_parses(chat_server, strict):
    api = client(chat_server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}
    whole = api.chat.completions.create(model=MODEL, messages=MESSAGES, seed=7, max_tokens=300, response_format=fmt)
    parts = [c.choices[0].delta.content for c in api.chat.completions.create(
        model=MODEL, messages=MESSAGES, seed=7, max_tokens=300, response_format=fmt, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert len(parts) > 1 and "".join(parts) == whole.choices[0].message.content
    jsonschema.validate(json.loads("".join(parts)), PERSON)


def test_one_schema_gives_one_text_on_every_route_alone_and_under_load(chat_server):
    """/generate's structured_outputs.json, /v1/completions' response_format: one engine request, one text;
    and the same text again while other constrained and plain requests share the batch."""
    prompt = "KING:\n"
    native = post(chat_server, "/generate", {"prompt": prompt, "max_new_tokens": 200, "seed": 5, "temperature": 1.0,
                                             "structured_outputs": {"json": PERSON}}).json()
    jsonschema.validate(json.loads(native["text"]), PERSON)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    legacy = client(chat_server).completions.create(model=MODEL, prompt=prompt, max_tokens=200, seed=5,
                                                    extra_body={"response_format": fmt})
    assert legacy.choices[0].text == native["text"]

    def one(i: int) -> str:
        body = {"prompt": prompt, "max_new_tokens": 200, "seed": 5 + i % 3, "temperature": 1.0}
        if i % 2 == 0:
            body["structured_outputs"] = {"json": PERSON}
        return post(chat_server, "/generate", body).json()["text"]

    alone = [one(i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(6))) == alone
    assert alone[0] == native["text"]


@pytest.mark.parametrize("body, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": 5000}}, "required": ["a"]}}}},
     ("more than 4096", "did not compile within")),  # which comes first depends on the machine's speed
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "not both"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}}, "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "odd", "schema": {"type": "frobnicate"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_what_cannot_be_served_as_json_gets_a_400_that_says_so(chat_server, body, says):
    r = httpx.post(chat_server.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body}, timeout=60)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and any(s in message for s in ((says,) if isinstance(says, str) else says)), r.text
