"""The scheduler's decisions (service/engine/scheduler.py), and a real engine that follows them: a short
prompt is never queued behind a long one, a loop ingests one bounded block, a long prompt is not
starved, and one request never holds more than its share of rows."""

from __future__ import annotations

import threading

import pytest

from service.engine.engine import Engine, EngineConfig
from service.backends.torch_fp32 import TorchBackend
from service.engine.scheduler import Scheduler
from service.engine.stream import Phase, RequestGroup, Stream
from service.engine.types import Done, GenerationRequest, Overloaded, PromptScored, Token

CHUNK = 64


def streams(prompt_lengths: list[int], group: RequestGroup | None = None, start: int = 0, **request) -> list[Stream]:
    out = []
    for i, n in enumerate(prompt_lengths):
        g = group or RequestGroup(1)
        req = GenerationRequest(prompt_ids=[1] * n, max_new_tokens=request.get("max_new_tokens", 10))
        out.append(Stream(req, listener=None, seed=0, feed=list(req.prompt_ids), now=0.0, group=g, seq=start + i))
    return out


def ingest(scheduler: Scheduler, block) -> None:
    """What the engine does with a block, without the arithmetic."""
    for stream, end in block:
        stream.fed = end
        if stream.fed == len(stream.feed):
            scheduler.ingested(stream)


def test_a_short_prompt_behind_eight_long_ones_is_ingested_in_the_first_loop():
    scheduler = Scheduler(max_rows=64, max_rows_per_request=16, prefill_chunk=CHUNK, prefill_rows=8)
    long = streams([20_000] * 8)
    short = streams([20], start=8)
    scheduler.enqueue(long + short)
    assert len(scheduler.admit(decoding=0)) == 9
    block = scheduler.plan()
    assert block[:2] == [(long[0], CHUNK), (short[0], 20)]  # the oldest's slice, then the shortest, whole
    assert len(block) == 8 and block[2:] == [(s, CHUNK) for s in long[1:7]]  # one block of 8 rows


def test_every_block_is_bounded_and_cuts_prompts_where_they_would_be_cut_alone():
    scheduler = Scheduler(max_rows=64, max_rows_per_request=16, prefill_chunk=CHUNK, prefill_rows=3)
    crowd = streams([1000, 130, 64, 65, 20, 333, 1, 8])
    scheduler.enqueue(crowd)
    scheduler.admit(decoding=0)
    loops = 0
    while scheduler.ingesting:
        block = scheduler.plan()
        assert 1 <= len(block) <= 3 and len({id(s) for s, _ in block}) == len(block)
        for stream, end in block:
            assert 0 < end - stream.fed <= CHUNK
            assert end == len(stream.feed) or end % CHUNK == 0  # cut at a multiple of the chunk, or the prompt's end
        ingest(scheduler, block)
        loops += 1
        assert loops < 100
    assert all(s.phase is Phase.DECODING and s.prompt_left == 0 for s in crowd)  # every character in, by blocks


def test_a_long_prompt_is_not_starved_by_short_ones_that_keep_arriving():
    scheduler = Scheduler(max_rows=1000, max_rows_per_request=16, prefill_chunk=CHUNK, prefill_rows=2)
    long = streams([10 * CHUNK])[0]
    scheduler.enqueue([long])
    scheduler.admit(decoding=0)
    seq, served, shorts = 1, [], []
    for loop in range(10):
        arrivals = streams([CHUNK - 1] * 4, start=seq)  # four a loop for one free row: an overload of short prompts
        seq += len(arrivals)
        shorts += arrivals
        scheduler.enqueue(arrivals)
        scheduler.admit(decoding=0)
        block = scheduler.plan()
        served += [loop for s, _ in block if s is long]
        ingest(scheduler, block)
    assert served == list(range(10)) and long.fed == len(long.feed)  # the oldest: a slice every loop
    assert sum(s.fed == len(s.feed) for s in shorts) == 10  # and the other row went to the shorts, one whole prompt a loop


def test_a_small_block_takes_longer_slices_within_a_full_blocks_time():
    """With the backend's estimate (here a step of n rows costs n + 1: the weights' reading is the 1), a
    lone prompt takes as many chunks as fit the time of a full block; a full block takes one chunk a row."""
    def block_seconds(rows: int, chars: int) -> float:
        return chars * (rows + 1)

    scheduler = Scheduler(max_rows=64, max_rows_per_request=16, prefill_chunk=CHUNK, prefill_rows=8, block_seconds=block_seconds)
    assert [scheduler.chunks_a_row(n) for n in (1, 2, 3, 4, 8)] == [4, 3, 2, 1, 1]  # k chunks x (n + 1) <= 1 chunk x 9
    lone = streams([10 * CHUNK + 5])[0]
    scheduler.enqueue([lone])
    scheduler.admit(decoding=0)
    assert scheduler.plan() == [(lone, 4 * CHUNK)]
    no_estimate = Scheduler(max_rows=64, max_rows_per_request=16, prefill_chunk=CHUNK, prefill_rows=8)
    assert no_estimate.chunks_a_row(1) == 1


def test_a_short_prompt_is_in_by_the_end_of_the_loop_that_admits_it_scored_or_not():
    scheduler = Scheduler(max_rows=64, max_rows_per_request=16, prefill_chunk=CHUNK)
    plain, scored = streams([5, 5])
    scored.request = GenerationRequest(prompt_ids=[1] * 5, max_new_tokens=5, prompt_logprobs=0)
    scheduler.enqueue([plain, scored])
    scheduler.admit(decoding=0)
    block = scheduler.plan()
    assert block == [(plain, 5), (scored, 5)]
    ingest(scheduler, block)
    assert not scheduler.ingesting and plain.phase is scored.phase is Phase.DECODING


def test_one_request_holds_at_most_its_rows_and_the_others_are_admitted_beside_it():
    scheduler = Scheduler(max_rows=64, max_rows_per_request=16, prefill_chunk=CHUNK)
    wide = RequestGroup(320)
    scheduler.enqueue(streams([5] * 320, group=wide))
    later = streams([5, 5, 5], start=320)
    scheduler.enqueue(later)
    admitted = scheduler.admit(decoding=0)
    assert sum(s.group is wide for s in admitted) == 16
    assert all(s in admitted for s in later)  # behind the wide request's 320 choices, in at once
    assert wide.rows == 16 and scheduler.waiting == 320 - 16
    # a choice that finishes gives its row to the next choice of its own request
    first = next(s for s in admitted if s.group is wide)
    first.end()
    scheduler.forget_finished()
    assert [s.group for s in scheduler.admit(decoding=0)] == [wide]


def test_requests_are_admitted_round_robin_one_stream_each_a_pass():
    scheduler = Scheduler(max_rows=4, max_rows_per_request=4, prefill_chunk=CHUNK)
    a, b = RequestGroup(4), RequestGroup(4)
    scheduler.enqueue(streams([5] * 4, group=a) + streams([5] * 4, group=b, start=4))
    admitted = scheduler.admit(decoding=0)
    assert [s.group for s in admitted] == [a, b, a, b]


# ---------------------------------------------------------------------- a real engine


class Recorder:
    """Every listener's events in the order the engine delivered them."""

    def __init__(self, expected: int):
        self.order: list[tuple[object, object]] = []
        self.done: dict[object, Done] = {}
        self.expected = expected
        self.all_done = threading.Event()
        self.first_event = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            for key, events in batch:
                for event in events:
                    self.order.append((key, event))
                    self.first_event.set()
                    if isinstance(event, Done):
                        self.done[key] = event
            if len(self.done) >= self.expected:
                self.all_done.set()

    def first(self, key, kind) -> int:
        return next(i for i, (k, e) in enumerate(self.order) if k == key and isinstance(e, kind))


def test_a_short_request_gets_its_first_character_before_long_prompts_ahead_of_it_are_in(tiny_model):
    vocab = tiny_model.vocab
    long_prompt = vocab.encode(("KING:\nthou art my lord.\n\n" * 400)[:8000])
    recorder = Recorder(expected=9)
    engine = Engine(TorchBackend(tiny_model.model), vocab, EngineConfig(max_batch_size=16, prefill_chunk=CHUNK), recorder)
    for i in range(8):  # queued first: before the fix, each loop's budget went to the head of this queue
        engine.submit(GenerationRequest(prompt_ids=long_prompt, max_new_tokens=5, seed=i, prompt_logprobs=0), f"long{i}")
    engine.submit(GenerationRequest(prompt_ids=vocab.encode("ROMEO: what light?"), max_new_tokens=5, seed=9), "short")
    engine.start()
    try:
        assert recorder.all_done.wait(120)
    finally:
        engine.stop()
    short_first = recorder.first("short", Token)
    for i in range(8):  # every long prompt was still being ingested when the short one wrote
        assert short_first < recorder.first(f"long{i}", PromptScored)
    assert all(d.finish_reason == "length" for d in recorder.done.values())


class StepSizes:
    """An observer that keeps each look's batch size and ignores the other numbers."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def on_step(self, batch_size: int, seconds: float, steps: int = 1) -> None:
        self.sizes.append(batch_size)

    def __getattr__(self, name):
        return lambda *args: None


def test_a_request_with_many_choices_counts_once_in_the_queue_and_holds_a_quarter_of_the_rows(tiny_model):
    vocab = tiny_model.vocab
    recorder = Recorder(expected=0)
    config = EngineConfig(max_batch_size=8, max_queue=1)  # rows_per_request: 2
    engine = Engine(TorchBackend(tiny_model.model), vocab, config, recorder)
    seen_rows = []
    engine.add_observer(StepSizes(seen_rows))
    wide = engine.submit_all([(GenerationRequest(prompt_ids=vocab.encode("KING:"), max_new_tokens=30, seed=i), f"c{i}")
                              for i in range(40)])
    assert len(wide) == 40
    for i in range(config.max_batch_size):  # 40 choices are one request: 8 more fit, then the bound holds
        engine.submit(GenerationRequest(prompt_ids=vocab.encode("QUEEN:"), max_new_tokens=30, seed=i), f"q{i}")
    with pytest.raises(Overloaded, match="requests are running or waiting"):
        engine.submit(GenerationRequest(prompt_ids=vocab.encode("FOOL:"), max_new_tokens=3), "refused")
    recorder.expected = 48
    engine.start()
    try:
        assert recorder.all_done.wait(120)
    finally:
        engine.stop()
    assert max(seen_rows) <= config.max_batch_size
    # the 8 single requests shared the rows with the wide one: each wrote its whole text before the
    # wide request's last choice began
    last_choice_start = max(recorder.first(f"c{i}", Token) for i in range(40))
    assert all(recorder.first(f"q{i}", Done) < last_choice_start for i in range(8))
    assert {d.finish_reason for d in recorder.done.values()} == {"length"}
