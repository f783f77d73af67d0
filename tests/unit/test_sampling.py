"""Per-stream random numbers and the vectorised sampling controls."""

import numpy as np
import torch

from service import sampling
from service.sampling import look_uniforms, sample_next, sample_plain, stream_key, uniforms


def controls(B, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0):
    return (np.full(B, temperature, dtype=np.float32), np.full(B, top_k, dtype=np.int64),
            np.full(B, top_p, dtype=np.float32), np.full(B, penalty, dtype=np.float32))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """The oracle's log-softmax, worked out in float64 apart from the sampler's own, in the input's dtype."""
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(x.dtype)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """torch.testing.assert_close's check for float32: same dtype and shape, rtol 1.3e-6, atol 1e-5."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype)
    np.testing.assert_allclose(actual, expected, rtol=1.3e-6, atol=1e-5)


def test_uniforms_depend_only_on_seed_and_counter():
    a = uniforms(np.array([5, 6, 5]), np.array([0, 0, 0]))
    assert a[0] == a[2] and a[0] != a[1]
    alone = uniforms(np.array([6]), np.array([0]))
    assert alone[0] == a[1]
    draws = uniforms(np.full(20000, 123), np.arange(20000))
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.01 and len(np.unique(draws)) == 20000


def test_a_looks_uniforms_are_each_steps_own():
    """`look_uniforms` (a look's k draws a row at once, from the batch's keys) gives each step's `uniforms`,
    bit for bit, on both of its paths (Python's integers for a few draws, numpy's for many)."""
    rng = np.random.default_rng(3)
    for rows in (1, 3, 8, 9, 64):
        seeds = rng.integers(0, 2**53 - 1, rows).astype(np.uint64)
        counters = rng.integers(0, 10**9, rows).astype(np.uint64)
        keys = np.array([stream_key(int(s)) for s in seeds], dtype=np.int64)
        for k in (1, 4):
            step_by_step = np.stack([uniforms(seeds, counters + np.uint64(j)) for j in range(k)])  # (k, B)
            assert np.array_equal(look_uniforms(keys, counters, k), step_by_step)


def test_each_row_samples_as_if_alone():
    logits = np.random.default_rng(0).standard_normal((16, 30), dtype=np.float32)
    seeds, counters = np.arange(16) * 7919, np.arange(16)
    u = uniforms(seeds, counters)
    batch, lp = sample_next(logits, *controls(16, 0.8, 10, 0.9), None, u)
    assert batch.dtype == np.int64 and lp.dtype == np.float32
    for i in range(16):
        one, one_lp = sample_next(logits[i : i + 1], *controls(1, 0.8, 10, 0.9), None, u[i : i + 1])
        assert one.item() == batch[i].item()
        assert_close(one_lp, lp[i : i + 1])


def test_greedy_top_k_one_and_tiny_top_p_pick_the_argmax():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((8, 20), dtype=np.float32)
    u = rng.random(8)
    best = logits.argmax(-1)
    assert np.array_equal(sample_next(logits, *controls(8, 0.0), None, u)[0], best)
    assert np.array_equal(sample_next(logits, *controls(8, 1.0, top_k=1), None, u)[0], best)
    assert np.array_equal(sample_next(logits, *controls(8, 1.0, top_p=1e-6), None, u)[0], best)


def test_filters_never_pick_outside_their_set_and_frequencies_follow_probabilities():
    logits = np.tile(np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32)), (4000, 1))
    u = uniforms(np.full(4000, 9), np.arange(4000))
    ids, _ = sample_next(logits, *controls(4000), None, u)
    freq = np.bincount(ids, minlength=4).astype(np.float64) / 4000
    np.testing.assert_allclose(freq, np.array([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    top2, _ = sample_next(logits, *controls(4000, top_k=2), None, u)
    assert set(top2.tolist()) == {0, 1}
    nucleus, _ = sample_next(logits, *controls(4000, top_p=0.75), None, u)  # 0.5 + 0.3 reaches 0.75
    assert set(nucleus.tolist()) == {0, 1}


def test_repetition_penalty_lowers_seen_characters():
    logits = np.array([[2.0, 1.9, -1.0]], dtype=np.float32)
    seen = np.array([[True, False, False]])
    u = np.array([0.5], dtype=np.float64)
    ids, lp = sample_next(logits, *controls(1, 0.0, penalty=2.0), seen, u)
    assert ids.item() == 1
    assert_close(lp, log_softmax(logits)[:, 1])  # log-prob under the model itself


def test_a_row_draws_the_same_whatever_the_other_rows_ask_for():
    logits = np.random.default_rng(2).standard_normal((6, 40), dtype=np.float32)
    u = uniforms(np.arange(6), np.zeros(6))
    plain, _ = sample_next(logits, *controls(6), None, u)
    mixed = controls(6)
    mixed[1][3] = 5  # one other row asks for top-k ...
    mixed[2][4] = 0.5  # ... and another for a nucleus
    with_filters, _ = sample_next(logits, *mixed, None, u)
    keep = [0, 1, 2, 5]
    assert with_filters[keep].tolist() == plain[keep].tolist()


def test_the_plain_sampler_draws_by_the_cdf_in_vocabulary_order_and_takes_the_argmax_when_greedy():
    temps = [1.0, 0.0, 0.8, 1.3, 0.0, 0.5] * 3
    B, V = len(temps), 40
    logits = np.random.default_rng(4).standard_normal((B, V), dtype=np.float32) * 3
    u = uniforms(np.arange(B) * 7, np.arange(B))
    temperature = np.array(temps, dtype=np.float32)
    greedy = temperature <= 0
    scale = np.where(greedy, np.float32(1.0), temperature)
    ids, lps = sample_plain(logits, scale, greedy, u)
    for i, t in enumerate(temps):  # what each row must pick, worked out alone, outside the sampler
        if t == 0:
            assert ids[i].item() == int(logits[i].argmax())
            continue
        x = logits[i] / np.float32(t)  # float32, as the sampler divides
        e = np.exp(x - x.max())
        cdf = np.cumsum((e / e.sum()).astype(np.float64))
        assert ids[i].item() == int(np.searchsorted(cdf, u[i].item() * cdf[-1], side="right"))
    assert_close(lps, np.take_along_axis(log_softmax(logits), ids[:, None], axis=1)[:, 0])
    # sample_next hands such rows to it; a batch with no greedy row may skip the argmax
    assert np.array_equal(sample_next(logits, *controls(B), None, u)[0],
                          sample_plain(logits, np.ones(B, dtype=np.float32), np.zeros(B, dtype=bool), u, any_greedy=False)[0])
    assert sample_plain(logits, scale, greedy, u, want_logprobs=False)[1] is None


def test_a_few_rows_take_the_same_uniforms_and_draws_as_the_vectorised_path(monkeypatch):
    """Up to SMALL_BATCH rows, uniforms and draws are worked out with Python's integers and floats; they must
    give the vectorised (numpy) path's bits, whatever the seed (2**64 - 1 included) or the distribution."""
    rng = np.random.default_rng(3)
    seeds = np.concatenate([rng.integers(0, 2**63, 300, dtype=np.uint64), np.array([2**64 - 1, 0], dtype=np.uint64)])
    counters = rng.integers(0, 2**40, len(seeds), dtype=np.uint64)
    x = rng.standard_normal((len(seeds), 65), dtype=np.float32) * 4
    e = np.exp(x - x.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)  # (B, 65) float32
    probs[::7, -5:] = 0.0  # columns no row may take
    fast_u = np.concatenate([sampling.uniforms(seeds[i : i + 2], counters[i : i + 2]) for i in range(0, len(seeds), 2)])
    fast_ids = np.concatenate([sampling._draw(probs[i : i + 2], fast_u[i : i + 2]) for i in range(0, len(seeds), 2)])
    monkeypatch.setattr(sampling, "SMALL_BATCH", 0)
    assert np.array_equal(fast_u, sampling.uniforms(seeds, counters))
    assert np.array_equal(fast_ids, sampling._draw(probs, fast_u))
    # the array API's form (what a device runs, here on torch's CPU tensors) against numpy's own calls
    assert np.array_equal(fast_ids, sampling._draw(torch.from_numpy(probs), torch.from_numpy(fast_u)).numpy())
    assert np.array_equal(sampling._draw(probs, np.zeros(len(seeds), dtype=np.float64)),
                          (probs > 0).astype(np.int64).argmax(1))
