"""The tools people point at an OpenAI-compatible server, run unchanged against a real one: LangChain's
`ChatOpenAI` and `OpenAI` (langchain-openai), and lm-evaluation-harness's `local-completions` model with
its remote tokenizer on a multiple-choice task made from the tests' own synthetic play."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAI

from ..conftest import SPEAKERS, make_play
from ..server import Server
from ..http.test_openai import MODEL, client

pytestmark = pytest.mark.tools


@pytest.fixture(scope="module")
def tool_server(trained_store):
    """The tiny model's vocabulary has no Z, so the chat speakers are ones it can write."""
    srv = Server(trained_store, chat_user_speaker="KING", chat_assistant_speaker="ROMEO")
    yield srv
    srv.stop()


# ---------------------------------------------------------------- LangChain

def test_langchain_chat_openai_gets_what_the_openai_client_gets(tool_server):
    chat = ChatOpenAI(base_url=tool_server.url + "/v1", api_key="unused", model=MODEL, temperature=0.9, seed=9,
                      max_tokens=50, max_retries=0, timeout=60)
    messages = [SystemMessage("A hall in the castle."), HumanMessage("Good night, sweet lady.")]
    reply = chat.invoke(messages)
    reference = client(tool_server).chat.completions.create(
        model=MODEL, temperature=0.9, seed=9, max_tokens=50,
        messages=[{"role": "system", "content": "A hall in the castle."}, {"role": "user", "content": "Good night, sweet lady."}])
    assert reply.content == reference.choices[0].message.content and reply.content
    assert reply.response_metadata["finish_reason"] == reference.choices[0].finish_reason
    assert reply.usage_metadata["input_tokens"] == reference.usage.prompt_tokens
    streamed = "".join(chunk.content for chunk in chat.stream(messages))
    assert streamed == reply.content


def test_langchain_openai_completions_and_stop(tool_server):
    llm = OpenAI(base_url=tool_server.url + "/v1", api_key="unused", model=MODEL, temperature=1.0, seed=3,
                 max_tokens=40, max_retries=0, timeout=60)
    text = llm.invoke("KING:\n")
    reference = client(tool_server).completions.create(model=MODEL, prompt="KING:\n", max_tokens=40, seed=3, temperature=1.0)
    assert text == reference.choices[0].text and text
    stopped = llm.invoke("KING:\n", stop=["\n"])
    assert "\n" not in stopped and text.startswith(stopped)
    assert "".join(llm.stream("KING:\n")) == text


# ---------------------------------------------------------------- lm-evaluation-harness

TASK = """\
task: charlstm_next_speech
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""


def speech_items(count: int, seed: int) -> list[dict]:
    """Which speaker line opens the next speech: the play's real one, or a line the play never writes."""
    rng = random.Random(seed)
    play = make_play(6_000, seed=seed)
    starts = [i for i in range(1, len(play)) if play.startswith("\n\n", i - 2) and i > 200]
    items = []
    for start in rng.sample(starts, count):
        speaker = play[start:play.index("\n", start)]
        wrong = [s.capitalize() + ":" for s in rng.sample(SPEAKERS, 2)] + [speaker.rstrip(":") + ","]
        # The context ends at the speech's last mark: the harness moves a context's trailing whitespace into
        # every continuation, so the blank line belongs to the choices here.
        choices = [f"\n\n{line}\n" for line in [speaker, *wrong]]
        rng.shuffle(choices)
        items.append({"context": play[start - 160:start - 2], "choices": choices, "gold": choices.index(f"\n\n{speaker}\n")})
    return items


def score(srv, text: str) -> list[float]:
    r = httpx.post(srv.url + "/score", json={"text": text}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["logprobs"]


def test_lm_eval_local_completions_with_the_remote_tokenizer(tool_server, tmp_path):
    items = speech_items(12, seed=11)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "charlstm_next_speech.yaml").write_text(TASK.format(items=tmp_path / "items.jsonl"))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "local-completions", "--tasks", "charlstm_next_speech",
         "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
         "--model_args", f"base_url={tool_server.url}/v1/completions,model={MODEL},tokenizer_backend=remote,"
                         "tokenized_requests=False,num_concurrent=1,max_retries=1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples = [json.loads(line) for path in out.rglob("samples_charlstm_next_speech_*.jsonl") for line in path.open()]
    assert len(samples) == len(items)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["charlstm_next_speech"]
    # Each choice's log-likelihood, as the harness summed it, is the sum /score gives for the same characters.
    right = 0
    for sample in samples:
        item = items[sample["doc_id"]]
        mine = [sum(score(tool_server, item["context"] + choice)[len(item["context"]) - 1:]) for choice in item["choices"]]
        theirs = [float(loglikelihood) for loglikelihood, _greedy in sample["filtered_resps"]]
        assert theirs == pytest.approx(mine, abs=1e-3)
        right += max(range(len(mine)), key=mine.__getitem__) == item["gold"]
    assert results["acc,none"] == pytest.approx(right / len(items))


# ---------------------------------------------------------------- pydantic-ai

def test_pydantic_ai_native_structured_output_gives_valid_objects(tool_server):
    """pydantic-ai's NativeOutput sends response_format json_schema (strict) and validates the reply."""
    from typing import Literal

    from pydantic import BaseModel, Field
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Speech(BaseModel):
        speaker: Literal["KING", "QUEEN", "FOOL"]
        line: str = Field(max_length=40)

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=tool_server.url + "/v1", api_key="unused"))
    agent = Agent(model, output_type=NativeOutput(Speech))
    outputs = [agent.run_sync("who comes here", model_settings={"seed": seed, "max_tokens": 300}).output for seed in range(3)]
    assert all(isinstance(o, Speech) for o in outputs)
    again = agent.run_sync("who comes here", model_settings={"seed": 0, "max_tokens": 300}).output
    assert again == outputs[0]  # the same seed, the same object
