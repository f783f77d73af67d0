"""Every step backend passes one contract (tests/backend_contract.py); the selector serves the fastest
that keeps it; a server on each backend keeps the HTTP guarantees. The engine's part of the contract
also runs on a small fake backend, so the engine is tested apart from any real arithmetic."""

from __future__ import annotations

import functools
import json

import httpx
import numpy as np
import pytest

from service.backends import available, build, choose
from service.backends.base import Backend
from service.backends.selector import QUALITY_TOLERANCE, for_serving, keeps_rows

from .. import backend_contract as contract

BACKENDS = available()
TOLERANCE = {"fp32": 1e-4, "int8": 0.08}  # logits and states against torch fp32: rounding, or int8's step of 1/63.5
# The cuda backend, eagerly on the CPU (no GPU here): its rows live in its decoder, which samples and steps them;
# through the engine that is the GPU's own path, graphs aside. Where torch is missing, it is too.
CONTRACT = [*BACKENDS, "cuda-on-cpu"] if "torch" in BACKENDS else BACKENDS


def gpu_here() -> bool:
    if "torch" not in BACKENDS:
        return False
    import torch

    return torch.cuda.is_available()


# On a GPU the engine's part of the contract runs on the real thing, its graphs captured (its host-side
# step is only a prompt's, so the row checks above stay with cuda-on-cpu).
THROUGH_THE_ENGINE = [*CONTRACT, *(["cuda"] if gpu_here() else []), "fake"]


def make(name: str, model, workers: int = 1) -> Backend:
    """A contract candidate by name; the cuda ones hold 32 rows, one step a look, as the contract's engines ask."""
    if name in ("cuda-on-cpu", "cuda"):
        return build("cuda", model, workers, device="cpu" if name == "cuda-on-cpu" else "cuda", capacity=32, max_steps=1)
    return build(name, model, workers)


class FakeBackend(Backend):
    """A recurrence with no multiply: h' = tanh(h/2 + table[id]) elementwise, logits = 3 * top h's
    first V columns (repeated where V > H). Every row is independent by construction, so the engine's own behaviour is what a test sees."""

    name = "fake"

    def __init__(self, model, workers: int = 1):
        super().__init__(model, workers)
        gen = np.random.default_rng(0)
        self.table = gen.random((self.vocab_size, self.num_layers, self.hidden), dtype=np.float32) * 2 - 1  # (V, L, H)

    def _step_rows(self, ids, state):
        h = np.tanh(state[0] / 2 + self.table[ids].transpose(1, 0, 2))  # (L, B, H)
        return np.stack([h, (state[1] + h) / 2])  # (2, L, B, H)

    def _head_rows(self, top):
        return 3 * np.tile(top, (1, -(-self.vocab_size // self.hidden)))[:, : self.vocab_size]  # (B, V)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return build("torch", tiny_model.model, 1)


@pytest.mark.parametrize("name", CONTRACT)
@pytest.mark.parametrize("workers", [1, 2])
def test_each_backend_keeps_shapes_rows_and_states(tiny_model, name, workers):
    backend = make(name, tiny_model, workers)
    try:
        contract.check_shapes(backend)
        contract.check_rows_alone_as_in_any_batch(backend)
        contract.check_state_moves_out_and_back(backend)
        contract.check_block_ingests_as_its_step(backend)
    finally:
        backend.close()


@pytest.mark.parametrize("name", [b for b in BACKENDS if b.startswith("onnx")])
def test_a_pipelined_block_gives_the_bits_of_one_layer_after_another(tiny_model, name):
    """ONNX Runtime's block with its layers at once on two threads, in pieces of 8 characters (whether it
    is on by default is measured, and a tiny model gains nothing from it): the contract still holds."""
    backend = build(name, tiny_model, 1)
    try:
        backend.pipelined, backend._piece = True, lambda rows, T: 8
        contract.check_block_ingests_as_its_step(backend)
    finally:
        backend.close()


@pytest.mark.parametrize("name", CONTRACT)
def test_each_backend_computes_the_model(tiny_model, reference, name):
    backend = make(name, tiny_model, 1)
    atol = TOLERANCE[backend.weights_kind]
    contract.check_logits_near_reference(backend, reference, atol)
    contract.check_prefill_lands_where_stepping_lands(backend, reference, atol)


@pytest.mark.parametrize("name", THROUGH_THE_ENGINE)
def test_each_backend_through_the_engine(tiny_model, name):
    new = (lambda: FakeBackend(tiny_model, 2)) if name == "fake" else functools.partial(make, name, tiny_model, 2)
    contract.check_seed_alone_and_in_a_crowd(new, tiny_model.vocab)
    contract.check_continuation_writes_what_one_stream_writes(new, tiny_model.vocab)
    contract.check_cancel_frees_the_row(new, tiny_model.vocab)
    contract.check_prompt_state_alone_as_under_load(new, tiny_model.vocab)


def test_the_fake_backend_breaks_the_row_guarantee_check_when_it_should(tiny_model):
    """The contract can fail: a backend whose rows see their batch's mean is caught."""

    class Leaky(FakeBackend):
        def _step_rows(self, ids, state):
            out = super()._step_rows(ids, state)
            return out + out.mean(axis=2, keepdims=True) * 1e-3

    with pytest.raises(AssertionError, match="rows of a batch"):
        contract.check_rows_alone_as_in_any_batch(Leaky(tiny_model))


def test_auto_serves_the_fastest_backend_that_keeps_the_guarantees(tiny_model):
    choice = choose(tiny_model, BACKENDS, max_batch_size=16)
    trials = {t.name: t for t in choice.trials}
    assert set(trials) == set(BACKENDS)
    serving = [t for t in choice.trials if t.dropped is None]
    assert choice.backend.name in {t.name for t in serving}
    for t in serving:
        assert t.bits_cost <= QUALITY_TOLERANCE and set(t.chars_per_s) == {1, 16} and min(t.chars_per_s.values()) > 0
    best = {size: max(t.chars_per_s[size] for t in serving) for size in (1, 16)}
    mean = lambda t: (t.chars_per_s[1] / best[1] * t.chars_per_s[16] / best[16]) ** 0.5  # noqa: E731
    assert mean(trials[choice.backend.name]) == max(mean(t) for t in serving)
    choice.backend.close()


def test_auto_drops_a_backend_that_breaks_rows_or_costs_quality(tiny_model, monkeypatch):
    """A candidate whose rows depend on their batch, and one whose quality cost is beyond the tolerance, do not serve."""
    from service.backends import selector

    real_build = selector.build

    def build_broken(name, model, workers=None, device="cpu"):
        backend = real_build(name, model, workers, device)
        if name == "torch-int8":  # rows that see their batch
            step = backend._step_rows
            backend._step_rows = lambda ids, state: (lambda out: out + out.mean(axis=2, keepdims=True) * 1e-3)(step(ids, state))
        if name == "onnx-int8":  # logits far from the model's
            head = backend._head_rows
            backend._head_rows = lambda top: head(top) * 0.2
            backend._fused_head = False
        return backend

    monkeypatch.setattr(selector, "build", build_broken)
    choice = choose(tiny_model, BACKENDS, max_batch_size=8)
    trials = {t.name: t for t in choice.trials}
    assert trials["torch-int8"].dropped == "a row's bits depend on its batch"
    if "onnx-int8" in trials:
        assert "bits/char" in trials["onnx-int8"].dropped and trials["onnx-int8"].bits_cost > QUALITY_TOLERANCE
    assert choice.backend.name in ("torch", "onnx")
    choice.backend.close()


def test_quantize_narrows_auto_to_those_weights(tiny_model):
    for quantize, kind in (("int8", "int8"), ("none", "fp32")):
        serving = for_serving(tiny_model, "auto", quantize, "cpu", max_batch_size=8)
        assert serving.backend.weights_kind == kind and {t.name for t in serving.choice.trials} <= {n for n in BACKENDS if (n.endswith("int8")) == (kind == "int8")}
        serving.backend.close()


def test_a_server_on_auto_shows_each_backend_figures_and_its_choice(trained_store, tmp_path):
    """auto measures in a child process and remembers the choice: a second start on the same weights,
    machine and settings builds the winner without measuring; other settings measure again."""
    from ..server import Server

    cache = tmp_path / "choices.json"

    def start(**settings) -> dict:
        srv = Server(trained_store, backend="auto", log_level="info", backend_cache=cache, **settings)
        try:
            engine = httpx.get(srv.url + "/info").json()["engine"]
            backend = engine["backend"]
            assert backend["choice"]["chosen"] == backend["name"]
            assert {t["name"] for t in backend["choice"]["trials"]} == set(BACKENDS)
            assert all(set(t["chars_per_s"]) == {"1", str(engine["max_batch_size"])} for t in backend["choice"]["trials"])
            assert "<- serves" in srv.output() and "chars/s" in srv.output()
            return backend
        finally:
            srv.stop()

    first = start()
    assert first["choice"]["remembered"] is False and len(json.loads(cache.read_text())) == 1
    again = start()
    assert again["choice"]["remembered"] is True and again["choice"]["trials"] == first["choice"]["trials"]
    assert again["name"] == first["name"]
    other = start(max_batch_size=16)  # another key: measured, and remembered beside the first
    assert other["choice"]["remembered"] is False and len(json.loads(cache.read_text())) == 2


def test_an_onnx_backend_keeps_no_fp32_copy_of_the_weights(tiny_model):
    """Its sessions hold the weights; it never builds the torch module, lets the fused fp32 copies go, and
    steps as before (its contract suite runs on it too). Every backend keeps stepping once the loaded
    model has let its own weights go (the server drops them after the build)."""
    from service.model.store import LoadedModel

    def fresh() -> LoadedModel:  # no torch module built yet, and its weights ours to drop
        return LoadedModel(tensors=dict(tiny_model.tensors), vocab=tiny_model.vocab, card=tiny_model.card,
                           path=tiny_model.path, config=tiny_model.config)

    for name in ("onnx", "onnx-int8"):
        loaded = fresh()
        backend = build(name, loaded)
        assert loaded._module is None and not hasattr(backend, "model") and backend.weights is None
        loaded.drop_module()
        assert keeps_rows(backend, 8)
        backend.close()
    loaded = fresh()
    backend = build("torch", loaded)
    loaded.drop_module()
    assert keeps_rows(backend, 8)
    backend.close()


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "torch"])
def test_a_server_on_each_backend_keeps_seeds_and_sessions(trained_store, name):
    """Over HTTP: a seed writes the same text alone and among 12 others, and a session continued over two
    calls writes what one call writes, on this backend."""
    from ..server import Server, alone_and_in_a_crowd

    srv = Server(trained_store, backend=name)
    try:
        assert httpx.get(srv.url + "/info").json()["engine"]["backend"]["name"] == name
        alone, responses = alone_and_in_a_crowd(srv.url, {"prompt": "KING:\n", "max_new_tokens": 60, "seed": 31}, 12)
        assert all(r.status_code == 200 for r in responses) and responses[0].json()["text"] == alone

        def session_text(lengths):
            sid = httpx.post(srv.url + "/sessions", json={"seed": 5, "prompt": "ROMEO:\n"}).json()["session_id"]
            return "".join(httpx.post(f"{srv.url}/sessions/{sid}/generate", json={"max_new_tokens": n}, timeout=60).json()["text"]
                           for n in lengths)

        assert session_text([20, 30]) == session_text([50])
    finally:
        srv.stop()
