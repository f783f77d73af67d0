"""The device step (service/engine/cuda_step.py): on the CPU it picks exactly what Runner + sample_next pick.

The CUDA-only tests at the end skip where no GPU is present (CI has none); everything else runs here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.cuda_step import CudaStep, device_uniforms, resolve_device, sample_rows
from service.engine.runner import Runner
from service.sampling import MAX_SEED, SamplingParams, sample_next, uniforms

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def random_streams(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    seeds = np.concatenate([[0, 1, MAX_SEED, 2**63 - 1], rng.integers(0, MAX_SEED, n - 4, dtype=np.int64)])
    counters = np.concatenate([[0, 2**40, 7, 2**62], rng.integers(0, 2**32, n - 4, dtype=np.int64)])
    return seeds, counters


def test_device_uniforms_are_bit_identical_to_sampling_uniforms():
    seeds, counters = random_streams(50_000)
    expected = uniforms(seeds.astype(np.uint64), counters.astype(np.uint64))  # (N,) float64
    got = device_uniforms(torch.from_numpy(seeds), torch.from_numpy(counters))
    assert got.dtype == torch.float64
    assert np.array_equal(got.numpy().view(np.uint64), expected.view(np.uint64))


def mixed_controls(B: int) -> list[SamplingParams]:
    """Plain, greedy, top-k, nucleus, penalised and combined rows, cycling."""
    kinds = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5),
             SamplingParams(top_p=0.9), SamplingParams(temperature=1.2, repetition_penalty=1.3),
             SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)]
    return [kinds[i % len(kinds)] for i in range(B)]


def as_tensors(params: list[SamplingParams]):
    return (torch.tensor([p.temperature for p in params]), torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params]), torch.tensor([p.repetition_penalty for p in params]))


@pytest.mark.parametrize("params", [[SamplingParams()] * 12, mixed_controls(12)], ids=["plain", "mixed"])
def test_sample_rows_picks_what_sample_next_picks(params):
    torch.manual_seed(3)
    B, V = len(params), 40
    logits = torch.randn(B, V) * 3
    seen = torch.rand(B, V) < 0.3
    u = torch.from_numpy(uniforms(np.arange(B, dtype=np.uint64) * 31, np.arange(B, dtype=np.uint64)))
    controls = as_tensors(params)
    penalised = any(p.repetition_penalty != 1.0 for p in params)
    ids, lps = sample_next(logits, *controls, seen if penalised else None, u)
    got_ids, got_lps = sample_rows(logits, *controls, seen if penalised else torch.zeros(B, V, dtype=torch.bool), u)
    assert torch.equal(got_ids, ids)
    assert torch.equal(got_lps, lps)


class Reference:
    """The CPU engine's decode arithmetic for a batch: Runner.logits, uniforms, sample_next, Runner.step."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.state = runner.zero_state(0)
        self.params: list[SamplingParams] = []
        self.seeds, self.counters = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        self.seen = torch.zeros(0, runner.vocab_size, dtype=torch.bool)

    def append(self, state, params, seed, counter, seen_ids):
        self.state = torch.cat([self.state, state.unsqueeze(2)], dim=2)
        self.params.append(params)
        self.seeds, self.counters = np.append(self.seeds, np.uint64(seed)), np.append(self.counters, np.uint64(counter))
        row = torch.zeros(1, self.runner.vocab_size, dtype=torch.bool)
        row[0, seen_ids] = True
        self.seen = torch.cat([self.seen, row])

    def filter(self, keep):
        idx = torch.tensor(keep)
        self.state, self.seen = self.state.index_select(2, idx), self.seen[idx]
        self.params = [self.params[i] for i in keep]
        self.seeds, self.counters = self.seeds[keep], self.counters[keep]

    def step(self):
        penalised = any(p.repetition_penalty != 1.0 for p in self.params)
        u = torch.from_numpy(uniforms(self.seeds, self.counters))
        ids, lps = sample_next(self.runner.logits(self.state), *as_tensors(self.params), self.seen if penalised else None, u)
        self.counters += np.uint64(1)
        self.seen[torch.arange(len(ids)), ids] = True
        self.state = self.runner.step(ids, self.state)
        return ids, lps


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded-to-bucket"])
def test_cpu_device_step_picks_exactly_what_the_runner_and_sample_next_pick(tiny_model, pad):
    vocab, runner = tiny_model.vocab, Runner(tiny_model.model)
    device_step = CudaStep(runner.weights, device="cpu", capacity=16, buckets=(1, 4, 8), pad=pad)
    assert not device_step.graphs and device_step.buckets == [1, 4, 8, 16]
    reference = Reference(runner)
    params = mixed_controls(7)
    with torch.inference_mode():
        def join(i, prompt):
            ids = vocab.encode(prompt)
            state = runner.prefill(ids, runner.zero_state())
            args = (state, params[i % len(params)], 1000 + 17 * i, 3 * i, ids)
            assert device_step.batch.append(*args) == len(reference.params)
            reference.append(*args)

        for i in range(7):
            join(i, ["KING:\n", "QUEEN:\nthou", "\n", "FOOL: my lord, the night is fair.\n"][i % 4])
        picked = []
        for t in range(60):
            if t == 20:  # two streams leave, the rest close ranks
                keep = [0, 2, 4, 5, 6]
                device_step.batch.filter(keep)
                reference.filter(keep)
            if t == 30:  # one joins
                join(7, "ROMEO:\n")
            ids, lps = reference.step()
            got = device_step.step()
            assert torch.equal(got, ids), f"step {t}"
            torch.testing.assert_close(device_step.batch.logprobs[: len(ids)], lps, rtol=1e-5, atol=1e-5)
            picked.append(ids)
        torch.testing.assert_close(device_step.batch.state[:, :, : device_step.batch.size], reference.state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(device_step.batch.row_state(2), reference.state[:, :, 2], rtol=1e-5, atol=1e-5)
        assert device_step.batch.row_counter(2) == int(reference.counters[2])
    assert len({tuple(p.tolist()) for p in picked}) > 30  # the rows really moved


def test_a_full_batch_is_refused_and_padding_stays_neutral(tiny_model):
    runner = Runner(tiny_model.model)
    device_step = CudaStep(runner.weights, device="cpu", capacity=4, buckets=(2,), pad=True)
    zero = runner.zero_state()
    for i in range(4):
        device_step.batch.append(zero, SamplingParams(), i, 0, [])
    with pytest.raises(RuntimeError, match="full"):
        device_step.batch.append(zero, SamplingParams(), 9, 0, [])
    device_step.step()
    device_step.batch.filter([3])
    assert device_step.batch.size == 1 and device_step.bucket(1) == 2
    assert float(device_step.batch.state[:, :, 1:].abs().sum()) == 0.0
    assert device_step.batch.counters.tolist() == [1, 0, 0, 0]
    assert device_step.step().shape == (1,)


def test_the_device_setting_resolves_or_says_why_not():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="one of cpu, cuda, auto"):
        resolve_device("tpu")


# ---------------------------------------------------------------------------------------------- CUDA only
@needs_cuda
def test_cuda_uniforms_are_bit_identical_to_sampling_uniforms():
    seeds, counters = random_streams(50_000, seed=1)
    expected = uniforms(seeds.astype(np.uint64), counters.astype(np.uint64))
    got = device_uniforms(torch.from_numpy(seeds).cuda(), torch.from_numpy(counters).cuda()).cpu()
    assert np.array_equal(got.numpy().view(np.uint64), expected.view(np.uint64))


@needs_cuda
def test_cuda_graph_replay_picks_what_eager_cuda_picks_alone_or_batched(tiny_model):
    """Same seed, same text on the same device: graphs against eager, one row against a padded batch of 37."""
    runner = Runner(tiny_model.model)
    graphs = CudaStep(runner.weights, device="cuda", capacity=64)
    eager = CudaStep(runner.weights, device="cuda", capacity=64, graphs=False, pad=True)
    alone = CudaStep(runner.weights, device="cuda", capacity=64)
    params = mixed_controls(37)
    ids = tiny_model.vocab.encode("KING:\n")
    with torch.inference_mode():
        state = runner.prefill(ids, runner.zero_state())
        for i in range(37):
            for s in (graphs, eager):
                s.batch.append(state, params[i], 500 + i, 0, ids)
        alone.batch.append(state, params[9], 509, 0, ids)
        for _ in range(50):
            batched, reference, single = graphs.step(), eager.step(), alone.step()
            assert torch.equal(batched, reference)
            assert single.tolist() == [batched[9].item()]
