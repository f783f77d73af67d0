"""The contract every step backend passes (service/backends/base.py): tests/contracts/test_backends.py runs it
against each backend installed here and against a small fake one.

A backend is free in its arithmetic (int8, another runtime); what it may not break is what the engine
and the sessions build on: shapes, a row's bits independent of its batch (padding and shares included),
a state that moves out of a batch and back in without change, prompt ingestion that lands where stepping
lands, and, through a real engine, the same seed writing the same text alone and in a crowd, a stream
continued from its returned state writing what one longer stream writes, and a cancel freeing its row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from service.backends.base import Backend
from service.engine.engine import Engine, EngineConfig
from service.engine.types import Done, GenerationRequest
from service.sampling import SamplingParams


def random_state(backend: Backend, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids (rows,) int64 and a state (2, L, rows, H) float32 with values in [-1, 1], as LSTM states are."""
    gen = np.random.default_rng(seed)
    state = gen.random((2, backend.num_layers, rows, backend.hidden), dtype=np.float32) * 2 - 1
    return gen.integers(0, backend.vocab_size, rows, dtype=np.int64), state


def check_shapes(backend: Backend) -> None:
    L, H, V = backend.num_layers, backend.hidden, backend.vocab_size
    assert backend.zero_state().shape == (2, L, H) and backend.zero_state(5).shape == (2, L, 5, H)
    ids, state = random_state(backend, 5)
    new = backend.step(ids, state)
    assert isinstance(new, np.ndarray) and new.shape == (2, L, 5, H) and new.dtype == np.float32
    logits = backend.logits(new)
    assert isinstance(logits, np.ndarray) and logits.shape == (5, V) and logits.dtype == np.float32
    assert not np.array_equal(new, state)
    assert isinstance(backend.describe()["name"], str)


def check_rows_alone_as_in_any_batch(backend: Backend, sizes=(1, 2, 3, 5, 17, 64, 130)) -> None:
    """Each row's next state and logits: the same bits whatever the batch around it."""
    ids, state = random_state(backend, max(sizes), seed=3)
    together = backend.step(ids, state)
    logits = backend.logits(together)
    for size in sizes:
        part = backend.step(ids[:size], state[:, :, :size])
        assert np.array_equal(part, together[:, :, :size]), f"{backend.name}: rows of a batch of {size} differ from the same rows among {max(sizes)}"
        assert np.array_equal(backend.logits(part), logits[:size])
    for row in (0, 41, max(sizes) - 1):  # alone, from the middle of the batch
        alone = backend.step(ids[row : row + 1], state[:, :, row : row + 1].copy())
        assert np.array_equal(alone, together[:, :, row : row + 1])
        assert np.array_equal(backend.logits(alone), logits[row : row + 1])
    waited = backend.start_step(ids, state)()  # the background form: the same result
    assert np.array_equal(waited, together)


def check_state_moves_out_and_back(backend: Backend) -> None:
    """A row taken out of a batch after 3 steps and stepped alone for 3 more ends where it would have."""
    ids, state = random_state(backend, 9, seed=5)
    inside = state
    for _ in range(6):
        inside = backend.step(ids, inside)
    outside = state
    for _ in range(3):
        outside = backend.step(ids, outside)
    row = outside[:, :, 4].copy()  # (2, L, H): what a session keeps
    alone = row[:, :, None]
    for _ in range(3):
        alone = backend.step(ids[4:5], alone)
    assert np.array_equal(alone[:, :, 0], inside[:, :, 4])


def check_block_ingests_as_its_step(backend: Backend) -> None:
    """A block of prompt slices (`ingest`): every row's state and top outputs are the bits of stepping that
    row alone through the backend's own step, character by character, whatever the other rows hold and
    however long their slices are (padding, the block graph and shares of max_rows included)."""
    gen = np.random.default_rng(5)
    lengths = [130, 1, 64, 9, 0, 33, 128, 2]
    slices = [gen.integers(0, backend.vocab_size, n).tolist() for n in lengths]
    _, state = random_state(backend, len(slices), seed=6)
    together, outputs = backend.ingest(slices, state, outputs=True)
    assert together.shape == state.shape and [tuple(y.shape) for y in outputs] == [(n, backend.hidden) for n in lengths]
    for r, ids in enumerate(slices):
        alone, alone_outputs = backend.ingest([ids], state[:, :, r : r + 1].copy(), outputs=True)
        stepped = state[:, :, r : r + 1]
        for t, i in enumerate(ids):
            stepped = backend.step(np.array([i], dtype=np.int64), stepped)
            assert np.array_equal(stepped[0, -1, 0], outputs[r][t]), f"{backend.name}: row {r}'s output {t} is not its step's"
        assert np.array_equal(together[:, :, r], stepped[:, :, 0]), f"{backend.name}: row {r} of a block is not its stepped state"
        assert np.array_equal(alone[:, :, 0], together[:, :, r]) and np.array_equal(alone_outputs[0], outputs[r])
    without, none = backend.ingest(slices, state)
    assert none is None and np.array_equal(without, together)


def check_prefill_lands_where_stepping_lands(backend: Backend, reference: Backend, atol: float) -> None:
    """A prompt ingested (`prefill`, a block of one row) ends near the reference's stepped state."""
    for length in (5, 40):
        ids = [(7 * i + 3) % backend.vocab_size for i in range(length)]
        state = backend.prefill(ids, backend.zero_state())
        stepped = reference.zero_state(1)
        for i in ids:
            stepped = reference.step(np.array([i], dtype=np.int64), stepped)
        assert state.shape == (2, backend.num_layers, backend.hidden)
        assert np.allclose(state, stepped[:, :, 0], atol=atol), (backend.name, length, float(np.abs(state - stepped[:, :, 0]).max()))
        scored, outputs = backend.prefill(ids, backend.zero_state(), outputs=True)
        assert np.array_equal(scored, state) and outputs.shape == (length, backend.hidden)


def check_logits_near_reference(backend: Backend, reference: Backend, atol: float) -> None:
    ids, state = random_state(backend, 8, seed=9)
    assert np.allclose(backend.logits(backend.step(ids, state)), reference.logits(reference.step(ids, state)), atol=atol)


# --- through a real engine -----------------------------------------------------------------------

def run(make: Callable[[], Backend], vocab, requests: list[GenerationRequest], config: EngineConfig | None = None,
        cancel_first: bool = False) -> list[Done]:
    """Run requests through an engine on a backend `make` builds (the engine closes it); their Done events in order."""
    done: dict[int, Done] = {}
    finished = threading.Event()
    first_token = threading.Event()

    def deliver(batch):
        for i, events in batch:
            for e in events:
                if isinstance(e, Done):
                    done[i] = e
                elif i == 0:
                    first_token.set()
        if len(done) == len(requests):
            finished.set()

    engine = Engine(make(), vocab, config or EngineConfig(max_batch_size=32, max_rows_per_request=32), deliver)
    engine.start()
    try:
        handles = [engine.submit(r, i) for i, r in enumerate(requests)]
        if cancel_first:
            assert first_token.wait(60)
            engine.cancel(handles[0])
        assert finished.wait(120)
    finally:
        engine.stop()
    return [done[i] for i in range(len(requests))]


def check_seed_alone_and_in_a_crowd(make: Callable[[], Backend], vocab) -> None:
    params = SamplingParams(temperature=0.9, top_k=20)
    request = GenerationRequest(prompt_ids=vocab.encode("KING:\nWhat say"), max_new_tokens=60, seed=42, params=params)
    alone = run(make, vocab, [request])[0]
    crowd = run(make, vocab, [GenerationRequest(prompt_ids=vocab.encode("A" * (i + 1)), max_new_tokens=40 + i, seed=i)
                                 for i in range(12)] + [request])
    assert crowd[-1].text == alone.text and len(alone.text) == 60
    assert len({d.text for d in crowd}) > 8


def check_continuation_writes_what_one_stream_writes(make: Callable[[], Backend], vocab) -> None:
    prompt = vocab.encode("ROMEO:\n")
    whole = run(make, vocab, [GenerationRequest(prompt_ids=prompt, max_new_tokens=50, seed=7, return_state=True)])[0]
    first = run(make, vocab, [GenerationRequest(prompt_ids=prompt, max_new_tokens=20, seed=7, return_state=True)])[0]
    rest = run(make, vocab, [GenerationRequest(prompt_ids=[], max_new_tokens=30, seed=7, counter=first.counter,
                                                  state=first.state, return_state=True)])[0]
    assert first.text + rest.text == whole.text
    assert np.array_equal(rest.state, whole.state)


def check_prompt_state_alone_as_under_load(make: Callable[[], Backend], vocab) -> None:
    """A prompt's state after ingestion, through the engine: the same bits alone, in a block beside 7 other
    prompts of other lengths, and while other streams decode; and its prompt log-probabilities too, which
    are those of any text it begins (a score is a property of the text, not of its length)."""
    prompt = vocab.encode(("KING:\nthou art my lord, and I thy humble servant.\n" * 12)[:500])

    def ask(**kw) -> GenerationRequest:
        return GenerationRequest(prompt_ids=prompt, max_new_tokens=0, return_state=True, prompt_logprobs=0, **kw)

    alone, *prefixes = run(make, vocab, [ask(), *(GenerationRequest(prompt_ids=prompt[:n], max_new_tokens=0, prompt_logprobs=0)
                                              for n in (5, 9, 130))])
    for n, prefix in zip((5, 9, 130), prefixes):  # a character's figure does not depend on what follows it
        assert prefix.prompt.logprobs == alone.prompt.logprobs[:n]
    others = [GenerationRequest(prompt_ids=prompt[: 37 * (i + 1)], max_new_tokens=3, seed=i) for i in range(7)]
    decoding = [GenerationRequest(prompt_ids=vocab.encode("ROMEO:"), max_new_tokens=200, seed=9 + i) for i in range(3)]
    crowd = run(make, vocab, [*decoding, *others, ask()], EngineConfig(max_batch_size=32, prefill_chunk=64))[-1]
    assert np.array_equal(crowd.state, alone.state)
    assert crowd.prompt.logprobs == alone.prompt.logprobs


def check_cancel_frees_the_row(make: Callable[[], Backend], vocab) -> None:
    long = GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=100_000, seed=1)
    short = GenerationRequest(prompt_ids=vocab.encode("QUEEN:\n"), max_new_tokens=10, seed=2)
    cancelled, after = run(make, vocab, [long, short], EngineConfig(max_batch_size=1, max_rows_per_request=1), cancel_first=True)
    assert cancelled.finish_reason == "cancelled" and after.finish_reason == "length" and len(after.text) == 10
