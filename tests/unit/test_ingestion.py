"""Prompt ingestion is deterministic: where a prompt is cut, and which kernel each slice takes,
depend on the prompt alone, never on what else is in flight."""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import numpy as np

from service.engine.engine import Engine, EngineConfig
from service.backends.torch_fp32 import TorchBackend
from service.engine.types import Done, GenerationRequest

from ..conftest import make_play
from .test_engine import same_bits

PROBE_LENGTHS = (1, 7, 9, 100, 511, 513, 1025, 2900)


def primed_states(tiny_model, probes: list[list[int]], crowd: list[list[int]]) -> list[np.ndarray]:
    """The state each probe prompt leads to, ingested by a real engine beside `crowd`'s prompts."""
    done: dict[int, Done] = {}
    all_in = threading.Event()
    requests = [GenerationRequest(prompt_ids=p, max_new_tokens=0, return_state=True) for p in probes + crowd]

    def deliver(batch):
        for i, events in batch:
            done.update({i: e for e in events if isinstance(e, Done)})
        if len(done) == len(requests):
            all_in.set()

    engine = Engine(TorchBackend(tiny_model.model), tiny_model.vocab, EngineConfig(max_batch_size=64, prefill_chunk=512), deliver)
    order = list(range(len(requests)))
    random.Random(len(crowd)).shuffle(order)  # probes land anywhere among the others
    for i in order:
        engine.submit(requests[i], i)
    engine.start()
    try:
        assert all_in.wait(120)
    finally:
        engine.stop()
    return [done[i].state for i in range(len(probes))]


def test_a_prompt_leads_to_the_same_state_bit_for_bit_alone_or_among_40_others(tiny_model):
    text = make_play(40_000, seed=11)
    probes = [tiny_model.vocab.encode(text[:n]) for n in PROBE_LENGTHS]
    rng = random.Random(3)
    crowd = [tiny_model.vocab.encode(text[(s := rng.randrange(30_000)) : s + rng.randint(300, 6000)]) for _ in range(40)]
    alone = [primed_states(tiny_model, [p], []) [0] for p in probes]
    together = primed_states(tiny_model, probes, crowd)
    for n, a, b in zip(PROBE_LENGTHS, alone, together):
        assert same_bits(a, b), f"a {n}-character prompt was ingested differently under load"


def test_seeded_requests_give_byte_identical_text_alone_and_while_40_streams_ingest(server):
    text = make_play(40_000, seed=12)
    rng = random.Random(4)
    probes = [dict(prompt=text[:n], max_new_tokens=60, seed=100 + n, temperature=1.0) for n in PROBE_LENGTHS]
    alone = [httpx.post(server.url + "/generate", json=p, timeout=120).content for p in probes]

    async def under_load():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            others = [client.post(server.url + "/generate", json=dict(
                prompt=text[(s := rng.randrange(30_000)) : s + rng.randint(500, 8000)], max_new_tokens=20)) for _ in range(40)]
            mine = [client.post(server.url + "/generate", json=p) for p in probes]
            return await asyncio.gather(*mine, *others)

    responses = asyncio.run(under_load())
    assert all(r.status_code == 200 for r in responses)
    for n, a, r in zip(PROBE_LENGTHS, alone, responses):
        assert r.content == a, f"a {n}-character prompt gave other text under load"
