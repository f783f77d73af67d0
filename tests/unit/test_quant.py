"""Int8 weights (service/backends/torch_int8.py): close to fp32, rows independent of their batch, same quality.

The bounds are stated here, measured on the models the tests use:
- one int8 matmul stays within the rounding bound of its two quantizations (derived below);
- along 400 characters of text, each runner stepping its own state from zero, the bundled model's
  int8 logits stay within 0.3 of fp32 and its next-character probabilities within 0.05 (measured:
  0.14 and 0.020 here, 0.20 and 0.029 over 2,000 characters of the validation split); the tiny test
  model's within 0.1 and 0.05.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from service.model import store
from service.backends.base import Backend
from service.engine.engine import Engine, EngineConfig
from service.backends.torch_int8 import Int8Linear
from service.backends.quality import score_chunks_stepped
from service.backends.torch_fp32 import TorchBackend
from service.backends.selector import WEIGHTS_BACKEND, build
from service.engine.types import Done, GenerationRequest
from service.training.evaluate import score_chunks
from service.sampling import SamplingParams, softmax
from service.model.vocab import OutOfVocabularyError

from ..conftest import make_play

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
                    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 3


@pytest.fixture(scope="module")
def bundled():
    return store.load("shakespeare@v1", REPO / "model_store")


def test_int8_matmul_stays_within_the_rounding_bound_of_its_quantizations():
    torch.manual_seed(0)
    K, N = 96, 40
    weight, bias = torch.randn(K, N) * 0.1, torch.randn(N)
    lin = Int8Linear(weight.numpy(), bias.numpy())  # built from the fused step's numpy arrays, called with torch tensors
    x = torch.rand(17, K) * 2 - 1  # (B, K) in [-1, 1], as LSTM outputs are
    exact = torch.addmm(bias, x, weight)  # (B, N)
    w_step = weight.abs().amax(0) / 127  # (N,): one scale per output column
    x_step = 2 / 127  # the fixed activation scale: range [-1, 1] on 7 bits
    bound = (x.abs() @ torch.full((K, N), 1.0)) * w_step / 2 + (x_step / 2) * weight.abs().sum(0) + K * w_step * x_step / 4 + 1e-5
    err = (lin(x) - exact).abs()  # (B, N)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0  # it really is quantized
    torch.testing.assert_close(lin(x[:, :50], x[:, 50:]), lin(x), rtol=0, atol=0)  # pieces concatenate


def test_a_rows_int8_result_does_not_depend_on_the_other_rows():
    """A per-tensor activation scale would give a small row a coarser grid inside a batch of large ones."""
    torch.manual_seed(1)
    lin = Int8Linear((torch.randn(64, 48) * 0.1).numpy(), torch.randn(48).numpy())
    x = torch.rand(33, 64) * 2 - 1
    x[7] *= 0.03  # alone, this row's own range would be about [-0.03, 0.03]
    batch = lin(x)
    for i in (0, 7, 32):
        assert torch.equal(lin(x[i : i + 1])[0], batch[i])
    assert torch.equal(lin(x[5:12])[2], batch[7])


def stepped_logits(runner: Backend, ids: list[int]) -> np.ndarray:
    """Logits after each character, stepping one stream from a zero state: (T, V)."""
    state, out = runner.zero_state(1), []
    for i in ids:
        state = runner.step(np.array([i], dtype=np.int64), state)
        out.append(runner.logits(state)[0])
    return np.stack(out)


@pytest.mark.parametrize("which, bound", [("bundled", 0.3), ("tiny", 0.1)])
def test_int8_logits_stay_close_to_fp32(which, bound, bundled, tiny_model):
    loaded = bundled if which == "bundled" else tiny_model
    text = SHAKESPEARE_TEXT if which == "bundled" else make_play(400, seed=3)
    ids = loaded.vocab.encode(text)[:400]
    fp32, int8 = stepped_logits(TorchBackend(loaded.model), ids), stepped_logits(build(WEIGHTS_BACKEND["int8"], loaded, 1), ids)
    diff = np.abs(int8 - fp32).max()
    assert 0 < float(diff) <= bound
    assert float(np.abs(softmax(int8) - softmax(fp32)).max()) <= 0.05
    agree = (int8.argmax(-1) == fp32.argmax(-1)).mean()
    assert float(agree) >= 0.97  # the most likely next character barely ever changes


def test_int8_batched_rows_equal_single_rows_on_the_bundled_model(bundled):
    runner = build("torch-int8", bundled, 2)
    try:
        gen = np.random.default_rng(2)
        B = 40  # two shares of 20 rows on the pool threads
        state = (gen.random((2, 2, B, 512), dtype=np.float32) * 2 - 1) * gen.random((1, 1, B, 1), dtype=np.float32)  # rows of very different ranges
        ids = gen.integers(0, len(bundled.vocab), B)  # (B,) int64
        batch = runner.step(ids, state)
        for i in (0, 19, 20, 39):
            one = runner.step(ids[i : i + 1], state[:, :, i : i + 1])
            assert np.array_equal(one[:, :, 0], batch[:, :, i])  # int8 matmuls: bit for bit
            # the head stays fp32, whose gemm may round a row differently at another batch size
            np.testing.assert_allclose(runner.logits(one)[0], runner.logits(batch)[i], rtol=1e-6, atol=1e-6)
    finally:
        runner.close()


def generate(loaded, requests: list[GenerationRequest], quantize: str, workers: int = 2) -> list[str]:
    """Texts of requests run together through a real engine on a runner with `quantize`."""
    done: dict[int, str] = {}
    finished = threading.Event()

    def deliver(batch):
        for i, events in batch:
            for e in events:
                if isinstance(e, Done):
                    done[i] = e.text
        if len(done) == len(requests):
            finished.set()

    engine = Engine(build(WEIGHTS_BACKEND[quantize], loaded, workers), loaded.vocab,
                    EngineConfig(max_batch_size=64), deliver)
    for i, request in enumerate(requests):
        engine.submit(request, i)
    engine.start()
    try:
        assert finished.wait(120)
    finally:
        engine.stop()
    return [done[i] for i in range(len(requests))]


def test_seeded_int8_generation_is_the_same_alone_and_in_a_batch(tiny_model):
    prompt = tiny_model.vocab.encode("KING:\n")
    mine = GenerationRequest(prompt_ids=prompt, max_new_tokens=120, seed=42, params=SamplingParams(temperature=0.9, top_p=0.95))
    others = [GenerationRequest(prompt_ids=tiny_model.vocab.encode("FOOL:" * (1 + i % 3)), max_new_tokens=60 + i,
                                seed=1000 + i, params=SamplingParams(temperature=1.0 + 0.05 * (i % 5))) for i in range(39)]
    alone = generate(tiny_model, [mine], "int8")[0]
    together = generate(tiny_model, [*others[:20], mine, *others[20:]], "int8")
    assert together[20] == alone and len(alone) == 120
    assert len(set(together)) == len(together)  # the other rows really generated text of their own


def test_stepped_fp32_score_equals_score_chunks_and_int8_costs_little(tiny_model):
    text = make_play(3000, seed=5)
    chunks = [text[i : i + 700] for i in range(0, len(text), 700)]  # the state carries across chunks
    reference = score_chunks(tiny_model.model, tiny_model.vocab, chunks)
    fp32 = score_chunks_stepped(TorchBackend(tiny_model.model), tiny_model.vocab, chunks)
    int8 = score_chunks_stepped(build(WEIGHTS_BACKEND["int8"], tiny_model, 1), tiny_model.vocab, chunks)
    assert fp32.chars == reference.chars == len(text) - 1
    assert fp32.nats_total == pytest.approx(reference.nats_total, rel=1e-5)
    assert int8.nats_total != fp32.nats_total
    assert abs(int8.bits_per_char - fp32.bits_per_char) <= 0.01


def test_stepped_score_names_unknown_characters_at_their_place_in_the_text(tiny_model):
    with pytest.raises(OutOfVocabularyError) as e:
        score_chunks_stepped(build(WEIGHTS_BACKEND["int8"], tiny_model, 1), tiny_model.vocab, ["KING:\n", "thou~"])
    assert e.value.unknown == {"~": [10]}


def test_an_unknown_backend_is_refused_with_the_names_it_could_be(tiny_model):
    with pytest.raises(ValueError, match="backend must be one of auto, torch, torch-int8, onnx, onnx-int8, cuda"):
        build("torch-int4", tiny_model, 1)


def test_the_service_serves_int8_and_a_seed_gives_the_same_text_alone_or_in_a_crowd(trained_store):
    import httpx

    from ..server import Server, alone_and_in_a_crowd

    srv = Server(trained_store, backend="torch-int8")
    try:
        engine = httpx.get(srv.url + "/info").json()["engine"]
        assert engine["quantize"] == "int8" and engine["step_workers"] == 1  # int8's default: no row shares
        alone, responses = alone_and_in_a_crowd(srv.url, {"prompt": "KING:\n", "max_new_tokens": 80, "seed": 31}, 20)
        assert all(r.status_code == 200 for r in responses) and responses[0].json()["text"] == alone
        assert len({r.json()["text"] for r in responses}) > 15
    finally:
        srv.stop()


def test_step_workers_default_by_backend_and_an_explicit_count_wins(tiny_model):
    assert build("torch", tiny_model).workers == 2 and build("torch-int8", tiny_model).workers == 1
    assert build("torch-int8", tiny_model, 2).workers == 2
    assert build("torch", tiny_model, 1).workers == 1
