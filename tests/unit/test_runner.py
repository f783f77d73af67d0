"""The engine's fused step and prompt ingestion compute what nn.LSTM computes, and what a naive per-gate loop does."""

from pathlib import Path

import numpy as np
import pytest
import torch

from service.model import store
from service.backends.torch_fp32 import TorchBackend
from service.backends.selector import WEIGHTS_BACKEND, build
from service.model.network import CharLSTM, CharLSTMConfig


def naive_lstm_step(model, ids, h, c):
    """The textbook recurrence, one gate at a time, as the reference (char-rnn's tests do the same)."""
    x = model.embed(ids)
    hs, cs = [], []
    for layer in range(model.config.num_layers):
        w_ih, w_hh = getattr(model.lstm, f"weight_ih_l{layer}"), getattr(model.lstm, f"weight_hh_l{layer}")
        b = getattr(model.lstm, f"bias_ih_l{layer}") + getattr(model.lstm, f"bias_hh_l{layer}")
        H = h.size(-1)
        pre = x @ w_ih.T + h[layer] @ w_hh.T + b
        i = torch.sigmoid(pre[:, :H])
        f = torch.sigmoid(pre[:, H : 2 * H])
        g = torch.tanh(pre[:, 2 * H : 3 * H])
        o = torch.sigmoid(pre[:, 3 * H :])
        cn = f * c[layer] + i * g
        hn = o * torch.tanh(cn)
        hs.append(hn)
        cs.append(cn)
        x = hn
    return torch.stack(hs), torch.stack(cs)


@torch.no_grad()
def test_fused_step_equals_nn_lstm_and_the_naive_loop():
    torch.manual_seed(0)
    model = CharLSTM(CharLSTMConfig(vocab_size=13, embed_dim=20, hidden_size=24, num_layers=3)).eval()
    runner = TorchBackend(model)
    B, T = 5, 9
    ids = torch.randint(0, 13, (B, T))
    ref_logits, (h_ref, c_ref) = model(ids)
    state = runner.zero_state(B)
    h, c = torch.zeros(3, B, 24), torch.zeros(3, B, 24)
    for t in range(T):
        state = runner.step(ids[:, t].numpy(), state)  # numpy in and out: (2, L, B, H) float32
        assert isinstance(state, np.ndarray) and state.dtype == np.float32
        h, c = naive_lstm_step(model, ids[:, t], h, c)
        torch.testing.assert_close(torch.from_numpy(runner.logits(state)), ref_logits[:, t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(state[0]), h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(state[1]), c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(state[0]), h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(state[1]), c_ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prefill_in_one_call_equals_stepping():
    torch.manual_seed(1)
    model = CharLSTM(CharLSTMConfig(vocab_size=9, embed_dim=16, hidden_size=16, num_layers=2, tie_weights=True)).eval()
    runner = TorchBackend(model)
    prompt = torch.randint(0, 9, (40,)).tolist()
    start = (torch.randn(2, 2, 16) * 0.1).numpy()
    one_call = runner.prefill(prompt, start)
    stepped = start[:, :, None]  # (2, L, 1, H)
    for t in prompt:
        stepped = runner.step(np.array([t], dtype=np.int64), stepped)
    np.testing.assert_allclose(one_call, stepped[:, :, 0], rtol=1e-5, atol=1e-5)
    # two slices with the state carried equal one call
    half = runner.prefill(prompt[20:], runner.prefill(prompt[:20], start))
    np.testing.assert_allclose(half, one_call, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_batch_split_over_worker_threads_steps_each_row_as_one_thread_does():
    """Shares of 16+ rows go to pool threads; the rows come back in order with the same numbers."""
    torch.manual_seed(2)
    model = CharLSTM(CharLSTMConfig(vocab_size=11, embed_dim=16, hidden_size=32, num_layers=2)).eval()
    alone, split = TorchBackend(model), TorchBackend(model, workers=3)
    try:
        B = 53  # three uneven shares: 17, 18, 18 rows
        state = (torch.randn(2, 2, B, 32) * 0.5).numpy()
        ids = torch.randint(0, 11, (B,)).numpy()
        expected = alone.step(ids, state)
        np.testing.assert_allclose(split.step(ids, state), expected, rtol=1e-6, atol=1e-6)
        in_background = split.start_step(ids, state)  # every share on the pool; the caller is free
        np.testing.assert_allclose(in_background(), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(split.step(ids[:20], state[:, :, :20]), expected[:, :, :20], rtol=1e-6, atol=1e-6)
    finally:
        split.close()


@pytest.mark.parametrize("quantize, workers", [("none", 1), ("none", 2), ("int8", 2)])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch_of_any_size(quantize, workers):
    """One seed, one text, alone or batched: a row's new state and logits must not depend on how many
    rows share the step. BLAS chooses its kernel by the number of rows and the kernels round
    differently, and which sizes share a kernel depends on the CPU (runner.row_bounds measures it), so this runs the bundled model, whose matrices are the size the service multiplies."""
    loaded = store.load(store.DEFAULT_MODEL, Path(__file__).resolve().parents[2] / "model_store")
    runner = build(WEIGHTS_BACKEND[quantize], loaded, workers)
    try:
        gen = np.random.default_rng(3)
        B = 256
        state = gen.random((2, 2, B, loaded.config.hidden_size), dtype=np.float32) * 2 - 1  # (2, L, B, H)
        ids = gen.integers(0, len(loaded.vocab), B)  # (B,) int64
        reference = runner.step(ids, state)  # (2, L, B, H)
        ref_logits = runner.logits(reference)  # (B, V)
        for size in (1, 2, 3, 17, 64, 129, 200):
            for first in sorted({0, B - size}):  # the rows at the batch's start and at its end
                rows = slice(first, first + size)
                stepped = runner.step(ids[rows], np.ascontiguousarray(state[:, :, rows]))
                assert np.array_equal(stepped, reference[:, :, rows]), (size, first)
                assert np.array_equal(runner.logits(stepped), ref_logits[rows]), (size, first)
    finally:
        runner.close()
