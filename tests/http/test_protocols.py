"""The protocols tools expect: vLLM's tokenizer endpoints, token-id prompts, chat completions through the
official `openai` client, and constrained output, against a real server (and the engine, for the bits)."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from service.engine.constraints import ConstraintError, compile_choices, compile_regex
from service.engine.engine import EngineConfig
from service.engine.types import Done, GenerationRequest
from service.sampling import SamplingParams

from ..unit.test_engine import run_engine
from .test_openai import MODEL, assert_openai_error, client

LINE = r"[A-Z][a-z]+(, [a-z]+)*[.!?]"  # the example: a short line of verse


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


# ---------------------------------------------------------------- tokenizer endpoints

def test_tokenizer_info_has_what_a_remote_tokenizer_reads(chat_server, tiny_model):
    info = httpx.get(chat_server.url + "/tokenizer_info", timeout=10).json()
    assert "eos_token" in info and info["eos_token"] is None and info["special_tokens"] == []
    assert info["vocab"] == {c: i for i, c in enumerate(tiny_model.vocab.chars)} and info["vocab_size"] == len(tiny_model.vocab)
    assert info["default_speakers"] == {"user": "KING", "assistant": "ROMEO"}
    # a client renders the published template itself (as lm-eval does) and gets the server's text
    messages = [{"role": "system", "content": "A street."}, {"role": "user", "content": "What light?"}]
    mine = ImmutableSandboxedEnvironment().from_string(info["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert mine == "A street.\n\nKING:\nWhat light?\n\nROMEO:\n"
    theirs = post(chat_server, "/tokenize", {"messages": messages, "return_token_strs": True}).json()
    assert "".join(theirs["token_strs"]) == mine and theirs["count"] == len(mine)
    assert post(chat_server, "/detokenize", {"tokens": theirs["tokens"]}).json() == {"prompt": mine}


def test_tokenize_then_token_ids_give_the_string_prompts_text(chat_server):
    tokens = post(chat_server, "/tokenize", {"prompt": "KING:\n", "add_special_tokens": False}).json()
    assert tokens["count"] == 6 and tokens["max_model_len"] > 0
    api = client(chat_server)
    by_text = api.completions.create(model=MODEL, prompt="KING:\n", max_tokens=30, seed=3)
    by_ids = api.completions.create(model=MODEL, prompt=tokens["tokens"], max_tokens=30, seed=3)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == 6
    both = api.completions.create(model=MODEL, prompt=[tokens["tokens"], tokens["tokens"][:3]], max_tokens=10, seed=3, echo=True)
    assert [c.text[:6] for c in both.choices] == ["KING:\n", "KIN" + both.choices[1].text[3:6]]


def test_token_ids_outside_the_vocabulary_get_400(chat_server, tiny_model):
    size = len(tiny_model.vocab)
    err = assert_openai_error(post(chat_server, "/v1/completions", {"model": MODEL, "prompt": [[1, size]]}), 400, "invalid_token")
    assert err["param"] == "prompt.1" and str(size) in err["message"]
    r = post(chat_server, "/detokenize", {"tokens": [0, size + 5]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens.1"
    assert post(chat_server, "/tokenize", {"prompt": "7"}).status_code == 422  # outside the vocabulary, named
    assert post(chat_server, "/tokenize", {"prompt": "KING", "model": "nope"}).status_code == 404


# ---------------------------------------------------------------- chat completions

def test_chat_matches_generate_on_the_rendered_prompt(chat_server):
    messages = [{"role": "user", "content": "Good night, sweet lady."}]
    chat = client(chat_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=60, seed=9, temperature=0.9)
    prompt = "".join(post(chat_server, "/tokenize", {"messages": messages, "return_token_strs": True}).json()["token_strs"])
    native = post(chat_server, "/generate", {"prompt": prompt, "max_new_tokens": 60, "seed": 9, "temperature": 0.9,
                                             "stop": ["\n\n"]}).json()
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == native["text"]
    assert choice.finish_reason == native["finish_reason"] and "\n\n" not in choice.message.content
    assert chat.object == "chat.completion" and chat.usage.prompt_tokens == len(prompt)


def test_streamed_chat_n_and_usage(chat_server):
    api = client(chat_server)
    messages = [{"role": "user", "content": "Wherefore art thou?"}]
    plain = api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=40, seed=4, n=2)
    assert [c.index for c in plain.choices] == [0, 1]
    assert plain.choices[0].message.content != plain.choices[1].message.content or plain.choices[0].finish_reason == "stop"
    texts, finishes, roles, usage = {0: "", 1: ""}, {}, set(), None
    for chunk in api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=40, seed=4, n=2, stream=True,
                                             stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles |= {c.delta.role} if c.delta.role else set()
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in plain.choices} and roles == {"assistant"}
    assert finishes == {c.index: c.finish_reason for c in plain.choices}
    assert usage.completion_tokens == plain.usage.completion_tokens and usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_logprobs_stop_and_speakers(chat_server):
    api = client(chat_server)
    r = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Thou art."}], max_tokens=12, seed=2,
                                    logprobs=True, top_logprobs=3, stop=["e"], extra_body={"speakers": {"assistant": "FOOL"}})
    content, lps = r.choices[0].message.content, r.choices[0].logprobs.content
    assert "e" not in content and [t.token for t in lps] == list(content)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in lps)
    assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in lps)
    rendered = "".join(post(chat_server, "/tokenize", {"messages": [{"role": "user", "content": "Thou art."}], "speakers": {"assistant": "FOOL"},
                                                      "return_token_strs": True}).json()["token_strs"])
    assert rendered.endswith("FOOL:\n")
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], extra_body={"speakers": {"user": "ZED"}})
    assert e.value.body["param"] == "speakers.user"
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])
    r = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "In 1597"}], max_tokens=5,
                                    extra_body={"unknown_chars": "skip"})
    assert r.choices[0].finish_reason in ("length", "stop")


# ---------------------------------------------------------------- constrained output

def test_every_constrained_text_matches_its_pattern(chat_server):
    api = client(chat_server)
    for seed in range(24):
        r = api.completions.create(model=MODEL, prompt="KING:\n", max_tokens=80, seed=seed, temperature=1.0,
                                   extra_body={"structured_outputs": {"regex": LINE}})
        text = r.choices[0].text
        if r.choices[0].finish_reason == "stop":
            assert re.fullmatch(LINE, text), text
        else:  # the length ran out first: what was written is still on the way to a match
            assert len(text) == 80 and re.fullmatch(r"[A-Z][a-z]*((, [a-z]*)|,)*", text), text


def test_choices_come_out_only_as_listed(chat_server):
    names = ["KING", "QUEEN", "FOOL", "GHOST"]
    seen = set()
    for seed in range(20):
        r = post(chat_server, "/generate", {"prompt": "\n\n", "seed": seed, "max_new_tokens": 10,
                                            "structured_outputs": {"choice": names}}).json()
        assert r["text"] in names and r["finish_reason"] == "stop", r
        seen.add(r["text"])
    assert len(seen) > 1
    chat = client(chat_server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who?"}], seed=1,
                                                       extra_body={"structured_outputs": {"choice": ["ay", "no"]}})
    assert chat.choices[0].message.content in ("ay", "no") and chat.choices[0].finish_reason == "stop"


def test_constraints_that_cannot_serve_get_400(chat_server):
    for structured, param in [({"regex": "[0-9]+"}, "structured_outputs.regex"),  # no digit in the vocabulary
                              ({"regex": "(unclosed"}, "structured_outputs.regex"),
                              ({"regex": "[a-z]{5000}"}, "structured_outputs.regex"),  # too many states
                              ({"regex": "(a|b)*a(a|b){14}"}, "structured_outputs.regex"),  # too slow to determinise
                              ({"choice": ["KING", "Zed"]}, "structured_outputs.choice"),
                              ({"regex": "a", "choice": ["a"]}, "structured_outputs")]:
        r = post(chat_server, "/generate", {"prompt": "", "structured_outputs": structured})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (structured, r.text)
        assert_openai_error(post(chat_server, "/v1/completions", {"model": MODEL, "prompt": "", "structured_outputs": structured}), 400)


def test_automata_cut_dead_ends_and_end_at_their_last_character(tiny_model):
    chars = list(tiny_model.vocab.chars)
    c = compile_choices(["KING", "KIN"], chars)
    ids = tiny_model.vocab.encode("KIN")
    state = 0
    for i in ids:
        assert not c.forbid[state, i]
        state = c.next[state, i]
    assert not c.terminal[state] and not c.forbid[state].any()  # "KIN" may end, or go on to "KING"
    assert c.terminal[c.next[state, tiny_model.vocab.encode("G")[0]]]
    with pytest.raises(ConstraintError):
        compile_regex("thou(7|8)", chars)  # every way to a match needs a digit
    assert compile_regex("thou(7|!)", chars).states == len("thou!") + 1  # the digit branch is cut away


def test_rows_without_a_constraint_keep_their_bits_beside_constrained_ones(tiny_model):
    line, names = compile_regex(LINE, list(tiny_model.vocab.chars)), compile_choices(["KING", "QUEEN"], list(tiny_model.vocab.chars))
    plain = [GenerationRequest(prompt_ids=tiny_model.vocab.encode("KING:\n"), max_new_tokens=60, seed=s, logprobs=True,
                               params=SamplingParams(temperature=0.9, top_k=(5 if s == 2 else 0))) for s in range(4)]
    held = [GenerationRequest(prompt_ids=tiny_model.vocab.encode("\n"), max_new_tokens=60, seed=10 + i, logprobs=True, constraint=c)
            for i, c in enumerate([line, names])]
    for decode_steps in (1, 4):
        config = EngineConfig(max_batch_size=8, decode_steps=decode_steps)
        alone, _ = run_engine(tiny_model, config, plain)
        mixed, _ = run_engine(tiny_model, config, [*plain, *held])
        done = {i: next(e for e in evs if isinstance(e, Done)) for i, evs in mixed.items()}
        for i in range(len(plain)):
            before = next(e for e in alone[i] if isinstance(e, Done))
            assert (done[i].text, done[i].logprobs) == (before.text, before.logprobs)
        assert done[4].finish_reason in ("stop", "length") and (done[4].finish_reason == "length" or re.fullmatch(LINE, done[4].text))
        assert done[5].text in ("KING", "QUEEN") and done[5].finish_reason == "stop"


# ---------------------------------------------------------------- what clients send as a matter of course

def test_the_fields_clients_send_with_harmless_values_are_accepted_and_change_nothing(chat_server):
    api = client(chat_server)
    messages = [{"role": "user", "content": "thou art my lord"}]
    plain = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, seed=4)
    sent = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, seed=4, store=False,
                                       metadata={"run": "test"}, service_tier="auto", parallel_tool_calls=False, tools=None,
                                       tool_choice=None, response_format={"type": "text"})
    assert sent.choices[0].message.content == plain.choices[0].message.content
    legacy = api.completions.create(model=MODEL, prompt="KING:", max_tokens=10, seed=4, extra_body={"store": False})
    assert legacy.choices[0].text == api.completions.create(model=MODEL, prompt="KING:", max_tokens=10, seed=4).choices[0].text


@pytest.mark.parametrize("extra, says", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}]},
     "'image_url' part is not supported"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]},
     "tool_calls are not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"store": True}, "store"),
])
def test_what_is_not_served_gets_a_400_that_says_so(chat_server, extra, says):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "KING"}], **extra}
    r = httpx.post(chat_server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_logit_bias_bans_and_favours_characters_by_their_ids(chat_server):
    """-100 never: a character the model writes often is banned and never appears, alone or among others;
    a large bias makes a character nearly certain. Keys are the ids /tokenize gives."""
    api = client(chat_server)
    ids = httpx.post(chat_server.url + "/tokenize", json={"model": MODEL, "prompt": "e "}, timeout=10).json()["tokens"]
    e, space = str(ids[0]), str(ids[1])
    plain = api.completions.create(model=MODEL, prompt="KING:\n", max_tokens=200, seed=3, n=3)
    assert any("e" in c.text for c in plain.choices)
    banned = api.completions.create(model=MODEL, prompt="KING:\n", max_tokens=200, seed=3, n=3, logit_bias={e: -100})
    assert all("e" not in c.text and len(c.text) == 200 for c in banned.choices)
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "thou art"}], max_tokens=100,
                                       seed=3, logit_bias={e: -100})
    assert "e" not in chat.choices[0].message.content
    favoured = httpx.post(chat_server.url + "/generate", json={"prompt": "KING:\n", "max_new_tokens": 50, "seed": 3,
                                                              "logit_bias": {space: 100}}, timeout=30).json()
    assert favoured["text"].count(" ") >= 45
    for bad, says in (({"999": 1}, "not a character id"), ({"x": 1}, "not a character id"), ({e: 101}, "less than or equal"),
                      ({"0" + e: 1, e: 2}, "not a character id"), ({"\u00b2": 1}, "not a character id")):  # "05" beside "5"; a digit int() refuses
        r = httpx.post(chat_server.url + "/v1/completions", json={"model": MODEL, "prompt": "K", "logit_bias": bad}, timeout=10)
        assert r.status_code in (400, 422) and says in r.json()["error"]["message"], r.text


def test_model_may_be_omitted_on_v1_and_a_length_beyond_the_limit_is_one_error_at_any_size(chat_server):
    r = httpx.post(chat_server.url + "/v1/completions", json={"prompt": "KING:", "max_tokens": 5, "seed": 1}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == MODEL  # the server's default model
    limit = httpx.get(chat_server.url + "/info", timeout=10).json()["limits"]["max_new_tokens"]
    for path, field, extra in (("/v1/completions", "max_tokens", {"prompt": "K"}), ("/generate", "max_new_tokens", {}),
                               ("/v1/chat/completions", "max_completion_tokens", {"messages": [{"role": "user", "content": "K"}]})):
        answers = [httpx.post(chat_server.url + path, json={field: n, **extra}, timeout=10) for n in (limit + 1, 100_000_000)]
        assert [a.status_code for a in answers] == [422, 422], [a.text for a in answers]
        assert all(f"limit {limit}" in a.json()["error"]["message"] for a in answers), [a.text for a in answers]


def test_a_pattern_that_does_not_parse_says_so_in_words():
    with pytest.raises(ConstraintError, match=r"InvalidSyntax: the pattern does not parse"):
        compile_regex("[a-", tuple("abc"))


def test_chat_errors_name_the_message_and_the_position_in_it(chat_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "thou art"}, {"role": "user", "content": "my {lord}"}]}
    r = httpx.post(chat_server.url + "/v1/chat/completions", json=body, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "messages.1.content", r.text
    assert "'{' (U+007B) at position 3" in error["message"] and "'}' (U+007D) at position 8" in error["message"]


def test_completion_tokens_count_what_the_model_drew_with_the_stop_string(chat_server):
    """The stop string is not returned, yet the model drew it (and a session moves past it), as vLLM counts it."""
    free = post(chat_server, "/generate", {"prompt": "KING:\n", "max_new_tokens": 60, "seed": 2}).json()
    stop = free["text"][20:22]
    stopped = post(chat_server, "/generate", {"prompt": "KING:\n", "max_new_tokens": 60, "seed": 2, "stop": [stop]}).json()
    assert stopped["finish_reason"] == "stop" and free["text"].startswith(stopped["text"] + stop)
    assert stopped["usage"]["completion_tokens"] == len(stopped["text"]) + len(stop)
