"""The engine without HTTP: prompt ingestion is sliced between decode steps, rows join and leave."""

from __future__ import annotations

import threading

from service.engine.engine import Engine, EngineConfig
from service.engine.runner import Runner
from service.engine.types import Done, GenerationRequest, Token


class Recorder:
    """An engine observer that keeps the order of steps and prompt slices."""

    def __init__(self):
        self.log: list[tuple[str, int]] = []

    def on_step(self, batch_size, seconds, steps=1):
        self.log.append(("step", batch_size))

    def on_prefill(self, chars, seconds):
        self.log.append(("prefill", chars))

    def __getattr__(self, name):  # the other numbers are not needed here
        return lambda *args: None


def run_engine(tiny_model, config, requests):
    """Run requests through a real engine and collect every stream's events and the step log."""
    events = {i: [] for i in range(len(requests))}
    finished = threading.Event()

    def deliver(batch):
        for i, evs in batch:
            events[i].extend(evs)
        if all(any(isinstance(e, Done) for e in evs) for evs in events.values()):
            finished.set()

    recorder = Recorder()
    engine = Engine(Runner(tiny_model.model), tiny_model.vocab, config, deliver)
    engine.add_observer(recorder)
    for i, req in enumerate(requests):
        engine.submit(req, i)  # all queued before the loop starts: the first step admits them together
    engine.start()
    try:
        assert finished.wait(120)
    finally:
        engine.stop()
    return events, recorder.log


def test_a_long_prompt_never_stalls_running_streams_for_more_than_a_slice(tiny_model):
    long_prompt = tiny_model.vocab.encode(("KING:\nthou art my lord.\n" * 200)[:4000])
    chunk = 256
    events, log = run_engine(tiny_model, EngineConfig(max_batch_size=4, prefill_chunk=chunk), [
        GenerationRequest(prompt_ids=[1, 2, 3], max_new_tokens=200, seed=1),
        GenerationRequest(prompt_ids=long_prompt, max_new_tokens=5, seed=2),
    ])
    slices = [n for kind, n in log if kind == "prefill"]
    assert max(slices) <= chunk and sum(slices) >= len(long_prompt)
    # while the long prompt was ingested, the first stream kept stepping between slices
    first_long = next(i for i, (kind, n) in enumerate(log) if kind == "prefill" and n == chunk)
    window = log[first_long : first_long + 2 * (len(long_prompt) // chunk)]
    assert sum(1 for kind, _ in window if kind == "step") >= len(long_prompt) // chunk - 1
    assert "".join(e.text for e in events[0] if isinstance(e, Token)) == next(e for e in events[0] if isinstance(e, Done)).text


def test_streams_join_and_leave_between_steps(tiny_model):
    lengths = [5, 40, 12, 1, 25]
    events, log = run_engine(tiny_model, EngineConfig(max_batch_size=8), [
        GenerationRequest(prompt_ids=[1], max_new_tokens=n, seed=i) for i, n in enumerate(lengths)])
    for i, n in enumerate(lengths):
        done = next(e for e in events[i] if isinstance(e, Done))
        assert done.completion_tokens == n and done.finish_reason == "length"
    sizes = [n for kind, n in log if kind == "step"]
    assert max(sizes) == 5 and sizes[-1] == 1  # all together at first, the longest alone at the end
    assert sizes == sorted(sizes, reverse=True)
