"""The engine on the cuda backend (service/backends/cuda.py: its rows on the device), run eagerly on the CPU.

The device path is what `--device cuda` serves with; here it runs on the CPU (no graphs, padded to its
buckets), where its picks are exactly the host path's picks, so the two engines must agree on every
stream: text, end, random-stream position, log-probabilities, alternatives and the final state,
whether a loop runs one step or several. On a GPU, tests/unit/test_cuda.py runs the same comparison there.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from service.backends.cuda import CudaBackend
from service.engine.step import QUIET_STEPS
from service.engine.engine import Engine, EngineConfig
from service.backends.torch_fp32 import TorchBackend
from service.engine.types import Done, GenerationRequest, Token
from service.sampling import SamplingParams


class StepLog:
    """Counts the engine's loops that stepped (on_step) and the characters they made."""

    def __init__(self):
        self.loops = 0

    def on_step(self, batch_size, seconds, steps=1):
        self.loops += 1

    def __getattr__(self, name):  # every other observer call is ignored
        return lambda *args: None


def run(tiny_model, requests, device_steps: int | None, config=EngineConfig(max_batch_size=16), cancel_after=None):
    """Every request through a real engine; device_steps None: the host path. Returns (events, loops, engine)."""
    events = {i: [] for i in range(len(requests))}
    finished = threading.Event()
    streams = {}

    def deliver(batch):
        for i, evs in batch:
            events[i].extend(evs)
            if cancel_after is not None and i == cancel_after and any(isinstance(e, Token) for e in evs):
                engine.cancel(streams[i])
        if all(any(isinstance(e, Done) for e in evs) for evs in events.values()):
            finished.set()

    runner = TorchBackend(tiny_model)
    if device_steps is not None:
        runner = CudaBackend(tiny_model, device="cpu", capacity=config.max_batch_size, buckets=(2, 4, 8), pad=True,
                             max_steps=device_steps)
        config = dataclasses.replace(config, decode_steps=device_steps)
    engine = Engine(runner, tiny_model.vocab, config, deliver)
    log = StepLog()
    engine.add_observer(log)
    for i, req in enumerate(requests):
        streams[i] = engine.submit(req, i)
    engine.start()
    try:
        assert finished.wait(120)
    finally:
        engine.stop()
    return events, log.loops, engine


def done_of(evs) -> Done:
    return next(e for e in evs if isinstance(e, Done))


def mixed_requests(tiny_model) -> list[GenerationRequest]:
    vocab, runner = tiny_model.vocab, TorchBackend(tiny_model)
    carried = runner.prefill(vocab.encode("KING:\nthou art my lord.\n"), runner.zero_state())
    P = SamplingParams
    specs = [
        ("KING:\n", 60, P(temperature=0.8), {}),
        ("QUEEN:\nthou", 45, P(temperature=0.9, top_k=5), {"stop": ("lord", "e ")}),
        ("", 33, P(top_p=0.9, repetition_penalty=1.3), {"logprobs": True}),
        ("FOOL: my lord", 50, P(temperature=0.7, presence_penalty=0.8, frequency_penalty=0.3, top_logprobs=3),
         {"logprobs": True}),
        ("ROMEO:\n", 40, P(temperature=0.0), {"return_state": True}),
        ("JULIET:\n", 70, P(temperature=1.1, top_k=10, top_p=0.8), {"stop": ("o",), "return_state": True}),
        ("GHOST:\n", 0, P(), {"return_state": True}),
        ("KING:\n", 1, P(temperature=0.8), {"return_state": True}),
        ("and ", 55, P(temperature=0.8), {"state": carried, "return_state": True}),
        ("QUEEN:\n", 25, P(temperature=0.6), {"stream_tokens": False, "logprobs": True}),
        ("KING:\n", 50, P(temperature=0.9), {"logit_bias": ((vocab.encode("e")[0], float("-inf")), (vocab.encode("o")[0], 3.0)),
                                              "logprobs": True}),
        ("KING:\n", 50, P(temperature=0.9, top_k=8), {"logit_bias": ((vocab.encode(" ")[0], -2.5),), "return_state": True}),
    ]
    return [GenerationRequest(prompt_ids=vocab.encode(prompt), max_new_tokens=n, params=params, seed=100 + i, **extra)
            for i, (prompt, n, params, extra) in enumerate(specs)]


@pytest.mark.parametrize("device_steps", [1, 8])
def test_device_mode_makes_what_the_host_path_makes(tiny_model, device_steps):
    requests = mixed_requests(tiny_model)
    host, _, _ = run(tiny_model, requests, None)
    device, _, engine = run(tiny_model, requests, device_steps)
    assert engine.decoder.size == 0  # every row gave its place back
    biased = done_of(device[10]).text  # logit_bias on the device: "e" never, "o" favoured
    assert "e" not in biased and biased.count("o") > biased.count(" ") and len(biased) == 50
    for i, request in enumerate(requests):
        want, got = done_of(host[i]), done_of(device[i])
        assert (got.text, got.finish_reason, got.completion_tokens, got.counter) == \
               (want.text, want.finish_reason, want.completion_tokens, want.counter), f"request {i}"
        if want.logprobs is not None:
            np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
        if want.top_logprobs is not None:
            assert [[c for c, _ in alt] for alt in got.top_logprobs] == [[c for c, _ in alt] for alt in want.top_logprobs]
        assert (got.state is None) == (want.state is None), f"request {i}"
        if want.state is not None:
            assert isinstance(got.state, np.ndarray) and got.state.dtype == np.float32 and got.state.shape == want.state.shape
            np.testing.assert_allclose(got.state, want.state, rtol=1e-5, atol=1e-5)
        tokens = [e for e in device[i] if isinstance(e, Token)]
        if request.stream_tokens:
            assert "".join(t.text for t in tokens) == got.text
        else:
            assert tokens == []
    assert [done_of(host[i]).finish_reason for i in (1, 5)] == ["stop", "stop"]  # both stop strings were met


def test_several_host_steps_a_look_make_what_one_step_a_look_makes(tiny_model):
    """The CPU path with decode_steps 8: same texts, ends, figures and session states, in fewer looks."""
    requests = mixed_requests(tiny_model)
    one, one_loops, _ = run(tiny_model, requests, None, config=EngineConfig(max_batch_size=16, quiet_steps=1))
    eight, eight_loops, _ = run(tiny_model, requests, None, config=EngineConfig(max_batch_size=16, decode_steps=8))
    assert eight_loops * 3 < one_loops
    for i in range(len(requests)):
        want, got = done_of(one[i]), done_of(eight[i])
        assert (got.text, got.finish_reason, got.completion_tokens, got.counter) == \
               (want.text, want.finish_reason, want.completion_tokens, want.counter), f"request {i}"
        assert got.logprobs == want.logprobs and got.top_logprobs == want.top_logprobs
        if want.state is not None:
            assert np.array_equal(got.state, want.state)
        if requests[i].stream_tokens:
            assert "".join(t.text for t in eight[i] if isinstance(t, Token)) == got.text


def test_a_loop_runs_several_device_steps_and_a_session_still_stops_exactly(tiny_model):
    """Eight characters a loop, and a session call that meets its stop string inside a loop hands back
    the state after its last character, as the host path (one step a loop) does."""
    vocab = tiny_model.vocab
    requests = [GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=64, seed=i) for i in range(3)]
    requests += [GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=64, seed=s, stop=(" ",),
                                   return_state=True) for s in range(10, 16)]
    host, _, _ = run(tiny_model, requests, None)
    device, loops, _ = run(tiny_model, requests, 8)
    assert loops <= 64 // 8 + 1
    stopped = [i for i in range(3, len(requests)) if done_of(host[i]).finish_reason == "stop"]
    assert any(done_of(host[i]).completion_tokens % 8 for i in stopped)  # some stopped inside a loop
    for i in range(len(requests)):
        want, got = done_of(host[i]), done_of(device[i])
        assert (got.text, got.finish_reason, got.completion_tokens) == (want.text, want.finish_reason, want.completion_tokens)
        if want.state is not None:
            np.testing.assert_allclose(got.state, want.state, rtol=1e-5, atol=1e-5)


def test_a_cancelled_device_row_leaves_and_the_others_go_on(tiny_model):
    vocab = tiny_model.vocab
    requests = [GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=200, seed=i) for i in range(3)]
    host, _, _ = run(tiny_model, requests, None)
    events, _, engine = run(tiny_model, requests, 4, cancel_after=1)
    assert done_of(events[1]).finish_reason == "cancelled" and done_of(events[1]).completion_tokens < 200
    for i in (0, 2):
        assert done_of(events[i]).text == done_of(host[i]).text
    assert engine.decoder.size == 0


def _serve(trained_store, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path

    base = {"CHARLSTM_MODEL_STORE": str(trained_store), "CHARLSTM_MODEL": "tiny", "CHARLSTM_SESSION_DB": ""}
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "0"], cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, **base, **env}, capture_output=True, text=True, timeout=60)


def test_int8_on_a_gpu_is_refused_with_one_message_naming_both(trained_store):
    out = _serve(trained_store, CHARLSTM_QUANTIZE="int8", CHARLSTM_DEVICE="cuda")
    assert out.returncode != 0 and "quantize=int8" in out.stderr and "device=cuda" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_stops_the_start_and_says_why(trained_store):
    out = _serve(trained_store, CHARLSTM_DEVICE="cuda")
    assert out.returncode != 0 and "no CUDA GPU" in out.stderr and "--device cpu or auto" in out.stderr


def test_a_server_with_several_steps_a_look_serves_the_same_text_and_sessions(trained_store, server):
    """Over HTTP: decode_steps 6 against the default, same seeds, plain and streamed, and a session call."""
    import httpx

    from ..server import Server

    looks = Server(trained_store, decode_steps=6, quiet_steps=2, session_db="")
    try:
        looks.wait_ready()
        info = httpx.get(looks.url + "/info").json()["engine"]
        assert info["decode_steps"] == 6 and info["device"] == "cpu" and info["quiet_steps"] == 2
        assert httpx.get(server.url + "/info").json()["engine"]["quiet_steps"] == QUIET_STEPS  # the default
        for body in ({"prompt": "KING:\n", "max_new_tokens": 50, "seed": 3, "temperature": 0.8},
                     {"prompt": "QUEEN:\n", "max_new_tokens": 40, "seed": 4, "stop": ["e "], "top_k": 5}):
            want = httpx.post(server.url + "/generate", json=body).json()
            got = httpx.post(looks.url + "/generate", json=body).json()
            assert (got["text"], got["finish_reason"]) == (want["text"], want["finish_reason"])
        texts = []
        for srv in (server, looks):
            sid = httpx.post(srv.url + "/sessions", json={"prompt": "ROMEO:\n", "seed": 9}).json()["session_id"]
            first = httpx.post(srv.url + f"/sessions/{sid}/generate", json={"max_new_tokens": 13, "stop": [" "]}).json()
            second = httpx.post(srv.url + f"/sessions/{sid}/generate", json={"max_new_tokens": 20}).json()
            texts.append((first["text"], second["text"]))
        assert texts[0] == texts[1]
    finally:
        looks.stop()


class Inbox:
    """Every listener's events, and a wait for the Done of some listeners (delivery, not the engine's books)."""

    def __init__(self):
        self.events: dict = {}
        self._cv = threading.Condition()

    def deliver(self, batch):
        with self._cv:
            for key, evs in batch:
                self.events.setdefault(key, []).extend(evs)
            self._cv.notify_all()

    def wait_done(self, *keys, timeout=60.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: all(any(isinstance(e, Done) for e in self.events.get(k, ())) for k in keys),
                                     timeout)


def _collecting_engine(tiny_model, steps=4):
    """A device-mode engine on the CPU whose events land in an Inbox."""
    inbox = Inbox()
    runner = CudaBackend(tiny_model, device="cpu", capacity=8, buckets=(2, 4), pad=True, max_steps=steps)
    engine = Engine(runner, tiny_model.vocab, EngineConfig(max_batch_size=8, decode_steps=steps), inbox.deliver)
    return engine, inbox


def test_a_device_fault_ends_the_batch_with_one_error_each_and_the_next_request_is_served(tiny_model):
    engine, inbox = _collecting_engine(tiny_model)
    events = inbox.events
    look, faults = engine.decoder.look, []

    def fails_once(*args):
        if not faults:
            faults.append(args)
            raise RuntimeError("injected device fault")
        return look(*args)

    engine.decoder.look = fails_once
    vocab = tiny_model.vocab
    for i in range(3):
        engine.submit(GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=40, seed=i), i)
    engine.start()
    try:
        assert inbox.wait_done(0, 1, 2)
        ends = {i: [e for e in events[i] if isinstance(e, Done)] for i in range(3)}
        assert all(len(d) == 1 and d[0].finish_reason == "error" for d in ends.values())
        assert engine.decoder.size == 0 and len(engine._batch) == 0
        engine.submit(GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=40, seed=7), "next")
        assert inbox.wait_done("next")
        done = done_of(events["next"])
        assert done.finish_reason == "length" and len(done.text) == 40 and engine.snapshot().ready
    finally:
        engine.stop()


def test_a_device_that_cannot_be_emptied_stops_the_engine_and_every_call_is_refused(tiny_model):
    from service.engine.types import EngineUnavailable

    engine, inbox = _collecting_engine(tiny_model)
    events = inbox.events
    engine.decoder.look = lambda *args: (_ for _ in ()).throw(RuntimeError("sticky device error"))
    engine.decoder.keep = lambda rows: (_ for _ in ()).throw(RuntimeError("sticky device error"))
    vocab = tiny_model.vocab
    for i in range(2):
        engine.submit(GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=40, seed=i), i)
    engine.start()
    try:
        assert inbox.wait_done(0, 1)
        assert all([e.finish_reason for e in events[i] if isinstance(e, Done)] == ["error"] for i in range(2))
        snapshot = engine.snapshot()
        assert snapshot.failed and not snapshot.ready
        with pytest.raises(EngineUnavailable):
            engine.submit(GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=5), "late")
    finally:
        engine.stop()


def test_auto_with_int8_serves_on_the_cpu_even_where_a_gpu_is_seen(tiny_model, monkeypatch):
    """int8 is a CPU kernel: `auto` then means the CPU, while an explicit cuda is refused by the settings."""
    from service.backends.selector import for_serving
    from service.settings import Settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    serving = for_serving(tiny_model, "auto", "int8", "auto", max_batch_size=8)
    assert serving.backend.describe()["device"] == "cpu" and serving.backend.weights_kind == "int8"
    assert serving.backend.decoder is None and serving.device_name == "cpu"
    with pytest.raises(ValueError, match="quantize=int8"):
        Settings(device="cuda", quantize="int8")


def test_on_the_device_logit_bias_is_served_and_a_constraint_is_refused_with_why(tiny_model):
    """A device look draws k characters before the host sees one, so an automaton cannot steer it: constrained
    output is refused at submission, by name. A logit bias is a fixed row of the device batch: it is served."""
    from service.engine.constraints import compile_regex
    from service.engine.types import Unsupported

    engine, inbox = _collecting_engine(tiny_model)
    vocab = tiny_model.vocab
    constrained = GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=5,
                                    constraint=compile_regex("[a-z]+", vocab.chars))
    with pytest.raises(Unsupported, match="constrained output runs on the CPU backends"):
        engine.submit(constrained, "constrained")
    engine.submit(GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=30, seed=3,
                                    logit_bias=((vocab.encode("a")[0], 100.0),)), "biased")
    engine.start()
    try:
        assert inbox.wait_done("biased")
    finally:
        engine.stop()
    assert done_of(inbox.events["biased"]).text == "a" * 30
