"""The device step (service/backends/cuda.py): on the CPU it picks exactly what TorchBackend + sample_next pick,
and the one sampler definition (service/sampling.py) picks the same on torch tensors as on numpy arrays.

The CUDA-only tests at the end skip where no GPU is present (CI has none); everything else runs here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from service.model import store
from service.backends.base import Backend
from service.backends.cuda import CudaBackend, CudaStep, resolve_device
from service.backends.torch_fp32 import TorchBackend
from service.sampling import MAX_SEED, SamplingParams, mix64, sample_next, stream_key, uniforms, uniforms_from_keys

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def random_streams(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    seeds = np.concatenate([[0, 1, MAX_SEED, 2**63 - 1], rng.integers(0, MAX_SEED, n - 4, dtype=np.int64)])
    counters = np.concatenate([[0, 2**40, 7, 2**62], rng.integers(0, 2**32, n - 4, dtype=np.int64)])
    return seeds, counters


def device_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The host's definition run on torch tensors (the device's form: each seed's key, then its draws)."""
    return uniforms_from_keys(mix64(seeds), counters)


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


def as_arrays(params: list[SamplingParams]) -> tuple[np.ndarray, ...]:
    """The controls as the host's sampler takes them: temperature, top_k, top_p, repetition_penalty (B,) each."""
    return (np.array([p.temperature for p in params], dtype=np.float32), np.array([p.top_k for p in params], dtype=np.int64),
            np.array([p.top_p for p in params], dtype=np.float32),
            np.array([p.repetition_penalty for p in params], dtype=np.float32))


def as_tensors(params: list[SamplingParams]) -> tuple[torch.Tensor, ...]:
    """The same controls as the device's sampler takes them."""
    return tuple(torch.from_numpy(a) for a in as_arrays(params))


@pytest.mark.parametrize("params", [[SamplingParams()] * 12, mixed_controls(12)], ids=["plain", "mixed"])
def test_the_sampler_picks_the_same_on_torch_tensors_branch_free_as_on_numpy(params):
    torch.manual_seed(3)
    B, V = len(params), 40
    logits = torch.randn(B, V) * 3
    seen = torch.rand(B, V) < 0.3
    u = uniforms(np.arange(B, dtype=np.uint64) * 31, np.arange(B, dtype=np.uint64))  # (B,) float64
    penalised = any(p.repetition_penalty != 1.0 for p in params)
    ids, lps = sample_next(logits.numpy(), *as_arrays(params), seen.numpy() if penalised else None, u)
    got_ids, got_lps = sample_next(logits, *as_tensors(params), seen if penalised else torch.zeros(B, V, dtype=torch.bool),
                                   torch.from_numpy(u), branch_free=True)
    assert np.array_equal(got_ids.numpy(), ids)
    # The figures: the same formula, with torch's exp and summation order against numpy's: float32 rounding.
    np.testing.assert_allclose(got_lps.numpy(), lps, rtol=1e-6, atol=1e-6)


def test_keys_hashed_once_give_the_same_draws_for_several_steps_at_once():
    seeds, counters = random_streams(1000, seed=2)
    keys = torch.tensor([stream_key(int(s)) for s in seeds])
    draws = torch.from_numpy(counters).unsqueeze(0) + torch.arange(3).unsqueeze(1)  # (3, N)
    got = uniforms_from_keys(keys.unsqueeze(0), draws)  # (3, N)
    for j in range(3):
        expected = uniforms(seeds.astype(np.uint64), (counters + j).astype(np.uint64))
        assert np.array_equal(got[j].numpy().view(np.uint64), expected.view(np.uint64))


class Reference:
    """The CPU engine's decode arithmetic for a batch: Backend.logits, uniforms, sample_next, Backend.step."""

    def __init__(self, runner: Backend):
        self.runner = runner
        self.state = runner.zero_state(0)  # (2, L, 0, H) float32
        self.params: list[SamplingParams] = []
        self.seeds, self.counters = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        self.seen = np.zeros((0, runner.vocab_size), dtype=np.bool_)

    def append(self, state, params, seed, counter, seen_ids):
        self.state = np.concatenate([self.state, state[:, :, None]], axis=2)
        self.params.append(params)
        self.seeds, self.counters = np.append(self.seeds, np.uint64(seed)), np.append(self.counters, np.uint64(counter))
        row = np.zeros((1, self.runner.vocab_size), dtype=np.bool_)
        row[0, seen_ids] = True
        self.seen = np.concatenate([self.seen, row])

    def filter(self, keep):
        self.state, self.seen = self.state[:, :, keep], self.seen[keep]
        self.params = [self.params[i] for i in keep]
        self.seeds, self.counters = self.seeds[keep], self.counters[keep]

    def step(self):
        penalised = any(p.repetition_penalty != 1.0 for p in self.params)
        u = uniforms(self.seeds, self.counters)
        ids, lps = sample_next(self.runner.logits(self.state), *as_arrays(self.params), self.seen if penalised else None, u)
        self.counters += np.uint64(1)
        self.seen[np.arange(len(ids)), ids] = True
        self.state = self.runner.step(ids, self.state)
        return ids, lps


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded-to-bucket"])
def test_cpu_device_step_picks_exactly_what_the_runner_and_sample_next_pick(tiny_model, pad):
    vocab, runner = tiny_model.vocab, TorchBackend(tiny_model.model)
    device_step = CudaStep(runner.weights, device="cpu", capacity=16, buckets=(2, 4, 8), pad=pad)
    assert not device_step.graphs and device_step.buckets == [2, 4, 8, 16]
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
            got = device_step.step()  # (n,) int64, a torch tensor on the host
            assert np.array_equal(got.numpy(), ids), f"step {t}"
            np.testing.assert_allclose(device_step.batch.logprobs[: len(ids)].numpy(), lps, rtol=1e-5, atol=1e-5)
            picked.append(ids)
        np.testing.assert_allclose(device_step.batch.state[:, :, : device_step.batch.size].numpy(), reference.state,
                                   rtol=1e-5, atol=1e-5)
        row = device_step.batch.row_state(2)  # (2, L, H) float32 on the host, as a session keeps it
        assert isinstance(row, np.ndarray) and row.dtype == np.float32
        np.testing.assert_allclose(row, reference.state[:, :, 2], rtol=1e-5, atol=1e-5)
        assert device_step.batch.row_counter(2) == int(reference.counters[2])
    assert len({tuple(p.tolist()) for p in picked}) > 30  # the rows really moved


def test_a_full_batch_is_refused_and_padding_stays_neutral(tiny_model):
    runner = TorchBackend(tiny_model.model)
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
    runner = TorchBackend(tiny_model.model)
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
            # the figures too, bit for bit: a row's softmax sums alike in a bucket of 2 and of 64
            assert torch.equal(alone.batch.logprobs[:1], graphs.batch.logprobs[9:10])


@needs_cuda
@pytest.mark.parametrize("full", [False, True], ids=["lean", "full"])
def test_cuda_multi_step_graphs_pick_what_single_steps_pick_and_keep_every_state(tiny_model, full):
    """decode(8) replayed as one graph against eight eager single steps, alone and batched; ring slot j
    holds the state after the j-th character."""
    runner = TorchBackend(tiny_model.model)
    multi = CudaStep(runner.weights, device="cuda", capacity=64, max_steps=8)
    single = CudaStep(runner.weights, device="cuda", capacity=64, graphs=False, pad=True)
    alone = CudaStep(runner.weights, device="cuda", capacity=64, max_steps=8)
    params = mixed_controls(29) if full else [SamplingParams(temperature=t) for t in (0.0, 0.7, 1.0, 1.2)] * 7
    ids = tiny_model.vocab.encode("KING:\n")
    with torch.inference_mode():
        state = runner.prefill(ids, runner.zero_state())
        for i, p in enumerate(params):
            for s in (multi, single):
                s.batch.append(state, p, 700 + i, 0, ids)
        alone.batch.append(state, params[5], 705, 0, ids)
        for _ in range(6):
            got = multi.decode(8, full)  # (8, n)
            lone = alone.decode(8, full)
            states = []
            for j in range(8):
                assert torch.equal(single.step(full), got[j])
                states.append(single.batch.state[:, :, 5].clone())
            assert lone[:, 0].tolist() == got[:, 5].tolist()
            for j in (1, 4, 8):
                assert np.array_equal(multi.batch.row_state(5, after=j), states[j - 1].cpu().numpy())


@needs_cuda
def test_cuda_engine_gives_a_seed_the_same_text_alone_or_among_others(tiny_model):
    """Through the engine with graphs: one seeded request alone, then among 40 others of every kind."""
    from service.engine.engine import Engine, EngineConfig
    from service.engine.types import Done, GenerationRequest

    vocab = tiny_model.vocab

    def run(requests):
        from .test_device_engine import Inbox

        runner, inbox = CudaBackend(tiny_model.model, device="cuda", capacity=64, max_steps=16), Inbox()
        engine = Engine(runner, vocab, EngineConfig(max_batch_size=64, decode_steps=16), inbox.deliver)
        for i, r in enumerate(requests):
            engine.submit(r, i)
        engine.start()
        try:
            assert inbox.wait_done(*range(len(requests)), timeout=120)
        finally:
            engine.stop()
        return [next(e for e in inbox.events[i] if isinstance(e, Done)) for i in range(len(requests))]

    target = GenerationRequest(prompt_ids=vocab.encode("KING:\n"), max_new_tokens=300, seed=42,
                               params=SamplingParams(temperature=0.8), return_state=True)
    others = [GenerationRequest(prompt_ids=vocab.encode("QUEEN:\n" * (i % 3 + 1)), max_new_tokens=50 + 7 * i, seed=i,
                                params=mixed_controls(40)[i], stop=("lord",) if i % 4 == 0 else ()) for i in range(40)]
    alone = run([target])[0]
    crowd = run([*others[:20], target, *others[20:]])[20]
    assert (crowd.text, crowd.counter) == (alone.text, alone.counter) and len(alone.text) == 300
    np.testing.assert_allclose(crowd.state, alone.state, rtol=1.3e-6, atol=1e-5)  # torch's float32 defaults


@needs_cuda
def test_cuda_engine_scores_a_prompt_that_continues_a_state_from_the_host(tiny_model):
    """A session's state comes from the host; scoring its next text beside a running stream works on the GPU."""
    from service.engine.engine import Engine, EngineConfig
    from service.engine.types import Done, GenerationRequest

    from .test_device_engine import Inbox

    vocab, host = tiny_model.vocab, TorchBackend(tiny_model.model)
    state = host.prefill(vocab.encode("KING:\nthou art"), host.zero_state())  # (2, L, H) on the CPU
    tail = vocab.encode(" my lord, and the night is fair.\n")
    runner, inbox = CudaBackend(tiny_model.model, device="cuda", capacity=8, max_steps=4), Inbox()
    engine = Engine(runner, vocab, EngineConfig(max_batch_size=8, decode_steps=4), inbox.deliver)
    engine.submit(GenerationRequest(prompt_ids=vocab.encode("QUEEN:\n"), max_new_tokens=60, seed=1), "running")
    engine.submit(GenerationRequest(prompt_ids=tail, max_new_tokens=0, state=state, prompt_logprobs=2,
                                    return_state=True), "scored")
    engine.start()
    try:
        assert inbox.wait_done("running", "scored", timeout=120)
    finally:
        engine.stop()
    running, scored = (next(e for e in inbox.events[k] if isinstance(e, Done)) for k in ("running", "scored"))
    assert running.finish_reason == "length" and scored.finish_reason == "length"
    on_cpu = host.prefill(tail, state, outputs=True)[1]  # (T, H)
    preceding = np.concatenate([state[0, -1:], on_cpu[:-1]])  # (T, H): the top h before each character
    logits = torch.from_numpy(host.logits(preceding.reshape(1, 1, len(tail), -1)))  # (T, V)
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(tail).unsqueeze(1))
    torch.testing.assert_close(torch.tensor(scored.prompt.logprobs), want.squeeze(1), rtol=1e-3, atol=1e-3)
    assert isinstance(scored.state, np.ndarray)


@needs_cuda
def test_cuda_rows_get_the_same_bits_alone_and_in_any_bucket_on_the_bundled_model():
    """cuBLAS, like MKL, picks its kernel by the number of rows; a seed must still write one text alone or
    batched. The bundled model's matrices (2 x 512), which a tiny model's do not stand for: one row (run
    as two), 50 and 256 rows, four steps a look, every ring state compared bit for bit."""
    loaded = store.load(store.DEFAULT_MODEL, Path(__file__).resolve().parents[2] / "model_store")
    runner = TorchBackend(loaded.model, device="cuda")
    gen = np.random.default_rng(4)
    states = gen.random((256, 2, runner.num_layers, runner.hidden), dtype=np.float32) * 2 - 1  # one (2, L, H) state a row
    steps = {n: CudaStep(runner.weights, device="cuda", capacity=n if n > 1 else 2, buckets=(), max_steps=4)
             for n in (1, 50, 256)}
    with torch.inference_mode():
        for n, step in steps.items():
            for i in range(n):
                step.batch.append(states[i], SamplingParams(temperature=0.8), 900 + i, 0, [])
        for _ in range(5):
            ids = {n: step.decode(4, full=False) for n, step in steps.items()}  # (4, n) each
            assert ids[1][:, 0].tolist() == ids[50][:, 0].tolist() == ids[256][:, 0].tolist()
            assert torch.equal(ids[50], ids[256][:, :50])
            for j in (1, 4):
                alone = steps[1].batch.row_state(0, after=j)
                assert np.array_equal(steps[50].batch.row_state(0, after=j), alone)
                assert np.array_equal(steps[256].batch.row_state(0, after=j), alone)
                assert np.array_equal(steps[256].batch.row_state(49, after=j), steps[50].batch.row_state(49, after=j))


class DeviceCalls(TorchDispatchMode):
    """Every aten call made under it, by name."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


# What a CUDA graph cannot hold: a value read back to the host (a Python decision on data waits for the
# device), a result whose size depends on the data, a tensor built from Python data during capture
# (torch.tensor: on a GPU, a copy from host memory).
NOT_IN_A_GRAPH = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal",
                  "aten::lift_fresh", "aten::masked_select", "aten::unique", "aten::_unique2"}


@pytest.mark.parametrize("full", [False, True], ids=["lean", "full"])
def test_the_device_steps_ask_nothing_of_the_device_a_cuda_graph_cannot_hold(tiny_model, full):
    """The device sampler is the host's definition (service/sampling.py) run on tensors: on the CPU, where
    graphs cannot be captured, the calls a look makes are read and none of them synchronises or sizes by data."""
    runner = TorchBackend(tiny_model.model)
    step = CudaStep(runner.weights, device="cpu", capacity=8, buckets=(2, 4), pad=True, max_steps=4)
    zero = runner.zero_state()
    for i, p in enumerate(mixed_controls(5)):
        step.batch.append(zero, p, 40 + i, 0, [1, 2])
    calls = DeviceCalls()
    with torch.inference_mode(), calls:
        step._steps(8, 4, full)
    assert "aten::addmm" in calls.names and "aten::cumsum" in calls.names  # the mode saw the step and the sampler
    assert bool(calls.names & {"aten::sort", "aten::argsort"}) == full  # the filters' sort: in the full variant only
    assert not calls.names & NOT_IN_A_GRAPH, sorted(calls.names & NOT_IN_A_GRAPH)
