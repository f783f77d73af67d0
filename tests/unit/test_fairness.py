"""Fairness between clients (service/engine/fairness.py): the scheduler's Virtual Token Counter and the
engine's queue shares, without HTTP; tests/http/test_fairness_http.py has them through a real server."""

from __future__ import annotations

import pytest

from service.backends.torch_fp32 import TorchBackend
from service.engine.engine import Engine, EngineConfig
from service.engine.fairness import ServiceCounters, queue_share
from service.engine.scheduler import Scheduler
from service.engine.stream import RequestGroup, Stream
from service.engine.types import Client, Done, GenerationRequest, Overloaded

A, B = Client("addr:a", "anonymous"), Client("addr:b", "anonymous")
CHARS = 30  # what each admitted stream is served in these simulations


def requests(client: Client, n: int, start: int = 0) -> list[Stream]:
    out = []
    for i in range(n):
        req = GenerationRequest(prompt_ids=[1], max_new_tokens=CHARS)
        out.append(Stream(req, listener=None, seed=0, feed=[1], now=0.0, group=RequestGroup(1, client), seq=start + i))
    return out


def run_rows(scheduler: Scheduler, loops: int) -> list[Client]:
    """Each loop: admit into the free rows, serve every admitted stream its characters, finish it. The
    clients in admission order."""
    order = []
    for _ in range(loops):
        for stream in scheduler.admit(decoding=0):
            order.append(stream.group.client)
            scheduler.fairness.served(stream.group.client, generated=CHARS)
            stream.fed = len(stream.feed)
            scheduler.ingested(stream)
            stream.end()
    return order


def test_a_free_row_goes_to_the_least_served_client_ahead_of_a_backlog():
    scheduler = Scheduler(max_rows=1, max_rows_per_request=1, prefill_chunk=64)
    scheduler.enqueue(requests(A, 40))
    assert run_rows(scheduler, 5) == [A] * 5
    scheduler.enqueue(requests(B, 3, start=40))  # 35 of A's still wait; B is lifted to A's counter
    assert run_rows(scheduler, 6) == [B, A] * 3  # B has the next row, then they alternate, ahead of A's backlog
    assert scheduler.waiting == 35 - 3


def test_weights_share_the_rows_in_their_ratio():
    heavy = Client("key:heavy", "heavy", weight=3.0)
    scheduler = Scheduler(max_rows=1, max_rows_per_request=1, prefill_chunk=64)
    scheduler.enqueue(requests(B, 100) + requests(heavy, 100, start=100))  # B first: arrival order favours it
    order = run_rows(scheduler, 40)
    assert order.count(heavy) == 30 and order.count(B) == 10


def test_a_client_back_from_idle_is_lifted_and_banks_nothing():
    scheduler = Scheduler(max_rows=1, max_rows_per_request=1, prefill_chunk=64)
    scheduler.enqueue(requests(A, 60))
    run_rows(scheduler, 20)  # A alone: 600 characters of service; B, idle, has none
    scheduler.enqueue(requests(B, 30, start=60))
    assert scheduler.fairness.of(B) == scheduler.fairness.of(A)  # lifted, not left at 0
    order = run_rows(scheduler, 10)
    assert order.count(A) == order.count(B) == 5  # without the lift, B would have taken all 10 rows
    counters = ServiceCounters()
    counters.served(A, generated=100)
    counters.lift(A, [B])  # never lowered by the lift
    assert counters.of(A) == 100


def test_prompt_characters_count_at_their_cost():
    counters = ServiceCounters(prompt_cost=0.25)
    counters.served(Client("key:x", "x", weight=2.0), generated=10, prompt=40)
    assert counters.of(Client("key:x", "x", weight=2.0)) == (10 + 0.25 * 40) / 2


def test_within_one_client_its_requests_are_served_round_robin():
    scheduler = Scheduler(max_rows=4, max_rows_per_request=4, prefill_chunk=64)
    one, two = RequestGroup(4, A), RequestGroup(4, A)
    streams = [Stream(GenerationRequest(prompt_ids=[1], max_new_tokens=5), None, 0, [1], 0.0, g, i)
               for i, g in enumerate([one] * 4 + [two] * 4)]
    scheduler.enqueue(streams)
    assert [s.group for s in scheduler.admit(decoding=0)] == [one, two, one, two]


def engine(tiny_model, **config) -> Engine:
    return Engine(TorchBackend(tiny_model.model), tiny_model.vocab, EngineConfig(**config))


def submit(eng: Engine, client: Client) -> None:
    eng.submit(GenerationRequest(prompt_ids=[1], max_new_tokens=5), None, client)


def test_a_flooding_client_fills_the_queue_and_the_next_client_is_still_let_in(tiny_model):
    eng = engine(tiny_model, max_batch_size=2, max_queue=4)  # bound: 6 requests running or waiting
    for _ in range(6):
        submit(eng, A)
    with pytest.raises(Overloaded, match="6 requests are running or waiting"):
        submit(eng, A)  # alone, A meets today's bound
    for _ in range(3):
        submit(eng, B)  # within B's share (half of 6), past the bound
    with pytest.raises(Overloaded, match="its share is 3"):
        submit(eng, B)
    with pytest.raises(Overloaded, match="this client holds 6, its share is 3"):
        submit(eng, A)  # and A is refused until it is back within its share


def test_a_weight_gives_a_larger_share_and_a_key_its_own_limit(tiny_model):
    eng = engine(tiny_model, max_batch_size=2, max_queue=4)
    heavy = Client("key:heavy", "heavy", weight=2.0)
    for _ in range(6):
        submit(eng, A)
    for _ in range(4):
        submit(eng, heavy)  # 6 x 2 / 3
    with pytest.raises(Overloaded):
        submit(eng, heavy)
    assert queue_share(6, heavy, {"addr:a": 1.0}) == 4.0
    capped = Client("key:capped", "capped", max_requests=2)
    fresh = engine(tiny_model, max_batch_size=8, max_queue=8)
    submit(fresh, capped)
    submit(fresh, capped)
    with pytest.raises(Overloaded, match="its limit"):
        submit(fresh, capped)
    submit(fresh, A)  # the queue itself has room


def test_a_row_is_paused_for_a_client_owed_its_share_and_the_paused_stream_writes_what_it_would_have(tiny_model):
    """Two rows, both A's long streams: B's request takes one of them at once (A holds more than its
    share, B less, and B is less served). A's paused stream resumes later with its state, penalties and
    random stream, and writes the text it writes when nobody interrupts it."""
    from service.sampling import SamplingParams

    from .test_scheduler import Recorder

    params = SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.4)

    def run(with_b: bool):
        recorder = Recorder(expected=3 if with_b else 2)
        eng = Engine(TorchBackend(tiny_model.model), tiny_model.vocab, EngineConfig(max_batch_size=2), recorder)
        paused = []
        eng.add_observer(type("Paused", (), {"on_paused": lambda self, n: paused.append(n),
                                             "__getattr__": lambda self, name: (lambda *a: None)})())
        for i in range(2):
            eng.submit(GenerationRequest(prompt_ids=tiny_model.vocab.encode("KING:"), max_new_tokens=300, seed=7 + i,
                                         params=params), f"a{i}", A)
        eng.start()
        try:
            if with_b:
                assert recorder.first_event.wait(60)  # A's streams are writing
                eng.submit(GenerationRequest(prompt_ids=tiny_model.vocab.encode("FOOL:"), max_new_tokens=5, seed=1), "b", B)
            assert recorder.all_done.wait(120)
        finally:
            eng.stop()
        return recorder, paused

    alone, _ = run(False)
    crowded, paused = run(True)
    assert sum(paused) >= 1
    assert crowded.first("b", Done) < min(crowded.first(f"a{i}", Done) for i in range(2))  # B was not kept waiting behind A
    for i in range(2):
        assert crowded.done[f"a{i}"].text == alone.done[f"a{i}"].text
