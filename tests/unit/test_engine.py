"""The engine without HTTP: prompt ingestion is sliced between decode steps, rows join and leave."""

from __future__ import annotations

import threading

import numpy as np

from service.engine.engine import Engine, EngineConfig
from service.engine.step import QUIET_STEPS
from service.backends.torch_fp32 import TorchBackend
from service.engine.types import Done, GenerationRequest, Token
from service.sampling import SamplingParams


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


def same_bits(a, b) -> bool:
    """Two arrays of the same dtype and shape with equal elements (torch.equal's check, for numpy's arrays)."""
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a, b))


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
    engine = Engine(TorchBackend(tiny_model.model), tiny_model.vocab, config, deliver)
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
    assert max(slices) <= chunk + 3 and sum(slices) == len(long_prompt) + 3  # the first loop's block holds both prompts
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


def test_a_row_only_its_length_can_end_sends_what_the_character_by_character_path_sends(tiny_model):
    """Output's inline path (no stop string, no constraint, no alternatives) against its general one, which a
    stop string that can never match takes: the same tokens (where each starts, its text and
    log-probabilities), the same end, with 1 and 4 steps a look."""
    never = "\x00"  # no character of the vocabulary: nothing is held back, the text is all released
    assert never not in tiny_model.vocab.chars
    for steps in (1, 4):
        requests = [GenerationRequest(prompt_ids=[1], max_new_tokens=n, seed=seed, logprobs=logprobs, stop=stop)
                    for n, seed, logprobs in ((37, 5, True), (9, 6, False)) for stop in ((), (never,))]
        events, _ = run_engine(tiny_model, EngineConfig(max_batch_size=8, decode_steps=steps), requests)
        for inline, general in ((0, 1), (2, 3)):
            tokens = [[(t.index, t.text, t.logprobs) for t in events[i] if isinstance(t, Token)] for i in (inline, general)]
            assert tokens[0] == tokens[1] and len(tokens[0]) > 1
            done = [next(e for e in events[i] if isinstance(e, Done)) for i in (inline, general)]
            assert (done[0].text, done[0].logprobs, done[0].finish_reason) == (done[1].text, done[1].logprobs, "length")


def test_stop_strings_searched_a_look_at_once_end_where_the_character_by_character_check_ends(tiny_model):
    """Rows with stop strings search a look's new text at once (`Output._stops_at_once`); asking for
    alternatives takes them character by character (`_one_by_one`). The same streams both ways: the same
    tokens (what is held back while it could still grow into a stop string, what is released), the same
    end, with 1 and 4 steps a look; some end at a stop string, some at their length (which of several
    stop strings ending at one character wins: tests/unit/test_stops.py)."""
    stops = ("e ", "the", "he ", "\n\n", "king")
    alternatives = SamplingParams(top_logprobs=1)
    for steps in (1, 4):
        config = EngineConfig(max_batch_size=16, decode_steps=steps)
        ways = [run_engine(tiny_model, config, [GenerationRequest(prompt_ids=[1], max_new_tokens=n, seed=seed, stop=stops,
                                                                  logprobs=True, params=params)
                                                for seed in range(12) for n in (3, 40)])[0]
                for params in (SamplingParams(), alternatives)]
        reasons = set()
        for i in range(24):
            at_once, one_by_one = ([(t.index, t.text, t.logprobs) for t in way[i] if isinstance(t, Token)] for way in ways)
            assert at_once == one_by_one
            done = [next(e for e in way[i] if isinstance(e, Done)) for way in ways]
            assert (done[0].text, done[0].finish_reason, done[0].completion_tokens, done[0].logprobs) == \
                (done[1].text, done[1].finish_reason, done[1].completion_tokens, done[1].logprobs)
            reasons.add(done[0].finish_reason)
        assert reasons == {"stop", "length"}


def test_a_prompt_seen_before_is_not_ingested_again_and_writes_the_same(tiny_model):
    """A fresh stream whose short prompt an earlier stream ingested starts from the kept state
    (prompt_cache.py): nothing is ingested for it, and its text, log-probabilities and final state are
    those of the first, bit for bit. A stream that continues a state, or scores its prompt, ingests its own."""
    done: dict[str, Done] = {}
    arrived = threading.Condition()

    def deliver(batch):
        with arrived:
            for name, evs in batch:
                done.update({name: e for e in evs if isinstance(e, Done)})
            arrived.notify_all()

    recorder = Recorder()
    engine = Engine(TorchBackend(tiny_model.model), tiny_model.vocab, EngineConfig(max_batch_size=4), deliver)
    engine.add_observer(recorder)
    engine.start()
    prompt = tiny_model.vocab.encode("KING:")

    def run(name: str, **fields) -> Done:
        engine.submit(GenerationRequest(prompt_ids=prompt, max_new_tokens=20, seed=3, logprobs=True, return_state=True,
                                        **fields), name)
        with arrived:
            assert arrived.wait_for(lambda: name in done, 60)
        return done[name]

    try:
        first = run("first")
        prefills = [n for kind, n in recorder.log if kind == "prefill"]
        again = run("again")
        assert [n for kind, n in recorder.log if kind == "prefill"] == prefills == [5]  # nothing ingested the second time
        assert engine.prompt_states.hits == 1
        assert (again.text, again.logprobs, again.prompt_tokens) == (first.text, first.logprobs, 5)
        assert same_bits(again.state, first.state)
        scored = run("scored", prompt_logprobs=0)
        continued = run("continued", state=first.state)
        assert [n for kind, n in recorder.log if kind == "prefill"] == [5, 5, 5] and engine.prompt_states.hits == 1
        assert scored.text == first.text and continued.text != first.text
    finally:
        engine.stop()


def test_a_short_prompt_is_in_at_once_and_writes_what_it_writes_alone(tiny_model):
    """A short prompt is ingested whole in the loop that admits it (a row of that loop's block) and its
    stream decodes from that loop's step on. Text, log-probabilities, alternatives, the penalties' counts,
    the random stream's position and the state after it are those of the same request alone, bit for
    bit, with 1 and 4 steps a look, and when its prompt is scored too."""
    params = SamplingParams(temperature=0.9, top_logprobs=2, presence_penalty=0.5, frequency_penalty=0.3,
                            repetition_penalty=1.2)

    def request(prompt: str, seed: int, n: int) -> GenerationRequest:
        return GenerationRequest(prompt_ids=tiny_model.vocab.encode(prompt), max_new_tokens=n, seed=seed, params=params,
                                 logprobs=True, return_state=True)

    for steps in (1, 4):
        config = EngineConfig(max_batch_size=8, decode_steps=steps)
        events, log = run_engine(tiny_model, config, [request("KING:", 7, 30)])
        scored = request("KING:", 7, 30)
        with_scores, _ = run_engine(tiny_model, config, [GenerationRequest(**{**scored.__dict__, "prompt_logprobs": 0})])
        busy, busy_log = run_engine(tiny_model, config, [request("", 1, 60), request("KING:", 7, 30), request("thou a", 3, 2)])
        assert busy_log[:2] == [("prefill", 1 + 5 + 6), ("step", 3)]  # one block, then all three rows from the first step on
        one = next(e for e in events[0] if isinstance(e, Done))
        among = next(e for e in busy[1] if isinstance(e, Done))
        assert among.text == one.text and among.completion_tokens == 30 and among.prompt_tokens == one.prompt_tokens == 5
        assert among.logprobs == one.logprobs and among.top_logprobs == one.top_logprobs and among.counter == one.counter == 30
        assert same_bits(among.state, one.state)
        reference = next(e for e in with_scores[0] if isinstance(e, Done))
        assert (reference.text, reference.logprobs, reference.top_logprobs) == (one.text, one.logprobs, one.top_logprobs)
        assert same_bits(reference.state, one.state)


def test_characters_wait_for_their_hand_over_but_first_characters_and_ends_do_not(tiny_model):
    """deliver_interval_s: a stream's first characters go out at once, later ones wait for the next hand-over
    (here never within the run), and the end takes everything with it; the text is the text of every loop's
    hand-over, and so is each listener's order of events."""
    def run(interval):
        handovers = []
        finished = threading.Event()

        def deliver(batch):
            handovers.append([(i, [type(e).__name__ for e in evs]) for i, evs in batch])
            if sum(name == "Done" for h in handovers for _, names in h for name in names) == 2:
                finished.set()
            for i, evs in batch:
                texts[interval].setdefault(i, []).extend(evs)

        engine = Engine(TorchBackend(tiny_model.model), tiny_model.vocab,
                        EngineConfig(max_batch_size=4, deliver_interval_s=interval), deliver)
        for i in range(2):
            engine.submit(GenerationRequest(prompt_ids=[1, 2], max_new_tokens=40, seed=7 + i), i)
        engine.start()
        try:
            assert finished.wait(120)
        finally:
            engine.stop()
        return handovers

    texts: dict[float, dict] = {0.0: {}, 3600.0: {}}
    every_loop, held = run(0.0), run(3600.0)
    assert len(every_loop) >= 40 // QUIET_STEPS  # one hand-over a loop (two rows, nobody waiting: looks of QUIET_STEPS)
    assert len(held) == 2  # the first characters of both streams (admitted together), then both ends
    assert sorted(i for i, names in held[0] if names == ["Token"]) == [0, 1]
    assert sorted(i for i, names in held[1] if names == ["Done"]) == [0, 1]
    for i in range(2):
        done = [e for e in texts[3600.0][i] if isinstance(e, Done)][0]
        assert done.text == [e for e in texts[0.0][i] if isinstance(e, Done)][0].text
        assert "".join(e.text for e in texts[3600.0][i] if isinstance(e, Token)) == done.text


def test_a_quiet_look_ends_after_the_step_at_which_someone_came(tiny_model):
    """A request that comes during a quiet look waits for one more step, not for the look's end, and a row
    that just joined gets its first character after one step; both streams write what they write alone."""
    first = GenerationRequest(prompt_ids=[1, 2], max_new_tokens=60, seed=3, logprobs=True, return_state=True)
    second = GenerationRequest(prompt_ids=[3], max_new_tokens=20, seed=4, logprobs=True, return_state=True)
    looks: list[int] = []  # each look's steps
    events = {0: [], 1: []}
    finished = threading.Event()

    class Observer(Recorder):
        def on_step(self, batch_size, seconds, steps=1):
            looks.append(steps)

    class ComesDuringTheThirdLook(TorchBackend):
        """Submits the second request at the first step of the third look."""
        submitted_in = None

        def logits(self, state):
            if len(looks) == 2 and self.submitted_in is None:
                self.submitted_in = len(looks)
                engine.submit(second, 1)
            return super().logits(state)

    def deliver(batch):
        for i, evs in batch:
            events[i].extend(evs)
        if all(any(isinstance(e, Done) for e in evs) for evs in events.values()):
            finished.set()

    backend = ComesDuringTheThirdLook(tiny_model.model)
    engine = Engine(backend, tiny_model.vocab, EngineConfig(max_batch_size=4), deliver)
    engine.add_observer(Observer())
    engine.submit(first, 0)
    engine.start()
    try:
        assert finished.wait(120)
    finally:
        engine.stop()
    assert looks[0] == 1  # a row that just joined: its first character goes out after one step
    assert looks[1] == QUIET_STEPS  # one row, nobody waiting: a whole quiet look
    assert looks[2] == 1  # the request came during the look's first step: the look ended with that step
    assert looks[3] == 1  # and its first character, too, waited for one step only
    alone, _ = run_engine(tiny_model, EngineConfig(max_batch_size=4), [first, second])
    for i in range(2):
        got, want = [e for e in events[i] if isinstance(e, Done)][0], [e for e in alone[i] if isinstance(e, Done)][0]
        assert (got.text, got.logprobs, got.counter) == (want.text, want.logprobs, want.counter)
        assert same_bits(got.state, want.state)


def test_a_logit_bias_is_its_own_rows_and_the_same_alone_or_among_others(tiny_model):
    """A row's bias changes its draws only: the other rows write what they write without it, and the
    biased row writes the same text alone as beside them."""
    banned = tiny_model.vocab.encode("e")[0]
    biased = GenerationRequest(prompt_ids=tiny_model.vocab.encode("KING:"), max_new_tokens=80, seed=5,
                               logit_bias=((banned, float("-inf")),))
    other = GenerationRequest(prompt_ids=tiny_model.vocab.encode("KING:"), max_new_tokens=80, seed=6)
    alone, _ = run_engine(tiny_model, EngineConfig(max_batch_size=4), [biased])
    plain, _ = run_engine(tiny_model, EngineConfig(max_batch_size=4), [other])
    together, _ = run_engine(tiny_model, EngineConfig(max_batch_size=4), [other, biased])
    text = lambda events: next(e for e in events if isinstance(e, Done)).text  # noqa: E731
    assert "e" not in text(alone[0]) and text(together[1]) == text(alone[0])
    assert text(together[0]) == text(plain[0])


def test_a_quiet_engine_takes_longer_looks_and_writes_the_same_text_state_and_figures(tiny_model):
    """One row with nobody waiting steps QUIET_STEPS a look; beside three others that come and go it also
    steps one a look. The text, the log-probabilities, the end state and the random stream's position are
    the same either way."""
    request = GenerationRequest(prompt_ids=[1, 2], max_new_tokens=37, seed=3, logprobs=True, return_state=True)
    others = [GenerationRequest(prompt_ids=[3], max_new_tokens=60, seed=10 + i) for i in range(3)]
    alone_events, alone_log = run_engine(tiny_model, EngineConfig(max_batch_size=4), [request])
    crowd_events, crowd_log = run_engine(tiny_model, EngineConfig(max_batch_size=4), [request, *others])
    alone = [e for e in alone_events[0] if isinstance(e, Done)][0]
    crowd = [e for e in crowd_events[0] if isinstance(e, Done)][0]
    assert alone.text == crowd.text and len(alone.text) == 37
    assert alone.logprobs == crowd.logprobs and alone.counter == crowd.counter
    assert same_bits(alone.state, crowd.state)
    loops = sum(kind == "step" for kind, _ in alone_log)
    assert loops <= -(-37 // QUIET_STEPS) + 1  # looks of QUIET_STEPS steps (the last may be shorter)
