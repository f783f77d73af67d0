"""The engine's log-probability reports and OpenAI's penalties, without HTTP: prompt log-probabilities
agree with `charlstm evaluate`, alternatives are sorted and consistent with the draw, and a control
nobody asks for changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.engine.engine import EngineConfig
from service.backends.torch_fp32 import TorchBackend
from service.engine.types import Done, GenerationRequest, PromptScored, Token
from service.training.evaluate import score_text
from service.sampling import SamplingParams

from ..conftest import make_play
from .test_engine import run_engine

TEXT = make_play(1500, seed=3)


def done_of(events) -> Done:
    return next(e for e in events if isinstance(e, Done))


@pytest.mark.parametrize("chunk", [512, 100, 7])  # how a prompt is cut does not change its figures
def test_prompt_logprobs_agree_with_evaluate(tiny_model, chunk):
    ids = tiny_model.vocab.encode(TEXT)
    events, _ = run_engine(tiny_model, EngineConfig(prefill_chunk=chunk), [
        GenerationRequest(prompt_ids=ids, max_new_tokens=0, prompt_logprobs=0),
        GenerationRequest(prompt_ids=[1, 2], max_new_tokens=50, seed=1),  # a running stream shares the engine
    ])
    scored = done_of(events[0]).prompt
    assert scored is not None and len(scored.logprobs) == len(ids) and scored.logprobs[0] is None
    assert [e for e in events[0] if isinstance(e, PromptScored)] == [scored]
    nats = -sum(scored.logprobs[1:]) / (len(ids) - 1)
    reference = score_text(tiny_model.model, tiny_model.vocab, TEXT)
    assert reference.chars == len(ids) - 1
    assert abs(nats - reference.nats_per_char) < 1e-4


def test_prompt_logprobs_continue_from_a_state(tiny_model):
    """After a state, every character counts, the first one included: the tail of one long scoring."""
    ids = tiny_model.vocab.encode(TEXT)
    head, tail = ids[:600], ids[600:]
    runner = TorchBackend(tiny_model.model)
    state = runner.prefill(head, runner.zero_state())
    events, _ = run_engine(tiny_model, EngineConfig(prefill_chunk=128), [
        GenerationRequest(prompt_ids=ids, max_new_tokens=0, prompt_logprobs=2),
        GenerationRequest(prompt_ids=tail, max_new_tokens=0, state=state, prompt_logprobs=2),
    ])
    whole, part = done_of(events[0]).prompt, done_of(events[1]).prompt
    assert part.logprobs[0] is not None
    assert np.allclose(np.array(part.logprobs, dtype=np.float32), np.array(whole.logprobs[600:], dtype=np.float32), atol=1e-4)
    assert part.top_logprobs[1:] == whole.top_logprobs[601:] or all(
        a[0] == b[0] and abs(a[1] - b[1]) < 1e-4 for x, y in zip(part.top_logprobs[1:], whole.top_logprobs[601:])
        for a, b in zip(x, y))
    for lp, top in zip(part.logprobs, part.top_logprobs):
        assert len(top) == 2 and top[0][1] >= top[1][1] and top[0][1] >= lp - 1e-6


def test_alternatives_are_sorted_and_hold_the_sampled_character_when_it_is_likely(tiny_model):
    params = SamplingParams(temperature=0.0, top_logprobs=5)  # greedy: the pick is the most likely character
    events, _ = run_engine(tiny_model, EngineConfig(), [
        GenerationRequest(prompt_ids=tiny_model.vocab.encode("KING:\n"), max_new_tokens=40, params=params, seed=1,
                          logprobs=True),
        GenerationRequest(prompt_ids=[3], max_new_tokens=40, seed=2, logprobs=True),  # asks for no alternatives
    ])
    done = done_of(events[0])
    assert len(done.top_logprobs) == len(done.text) == 40
    for char, lp, top in zip(done.text, done.logprobs, done.top_logprobs):
        values = [v for _, v in top]
        assert len(top) == 5 and values == sorted(values, reverse=True)
        assert top[0][0] == char and math.isclose(top[0][1], lp, abs_tol=1e-6)
    tokens = [e for e in events[0] if isinstance(e, Token)]
    assert sum((t.top_logprobs for t in tokens), ()) == done.top_logprobs
    assert done_of(events[1]).top_logprobs is None


def test_penalties_of_zero_change_nothing_beside_a_penalised_row(tiny_model):
    prompt = tiny_model.vocab.encode("KING:\n")
    plain = GenerationRequest(prompt_ids=prompt, max_new_tokens=120, seed=11)
    zero = GenerationRequest(prompt_ids=prompt, max_new_tokens=120, seed=11,
                             params=SamplingParams(presence_penalty=0.0, frequency_penalty=0.0))
    other = GenerationRequest(prompt_ids=prompt, max_new_tokens=120, seed=12,
                              params=SamplingParams(frequency_penalty=0.7, presence_penalty=0.3))
    alone, _ = run_engine(tiny_model, EngineConfig(), [plain])
    together, _ = run_engine(tiny_model, EngineConfig(), [zero, other])
    assert done_of(alone[0]).text == done_of(together[0]).text
    assert done_of(together[1]).text != done_of(together[0]).text


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_a_large_penalty_forbids_repeats(tiny_model, penalty):
    """Greedy with a huge penalty: no generated character comes back while unused ones remain."""
    n = min(30, len(tiny_model.vocab))
    events, _ = run_engine(tiny_model, EngineConfig(), [
        GenerationRequest(prompt_ids=[1], max_new_tokens=n, params=SamplingParams(temperature=0.0, **{penalty: 100.0})),
        GenerationRequest(prompt_ids=[1], max_new_tokens=n, params=SamplingParams(temperature=0.0)),
    ])
    penalised, plain = done_of(events[0]).text, done_of(events[1]).text
    assert len(set(penalised)) == n
    assert len(set(plain)) < n  # the model alone repeats itself, so the penalty did the work
