"""Per-stream random numbers and the vectorised sampling controls."""

import numpy as np
import torch

from service import sampling
from service.sampling import sample_next, sample_plain, uniforms


def controls(B, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0):
    return (torch.full((B,), float(temperature)), torch.full((B,), top_k, dtype=torch.long),
            torch.full((B,), float(top_p)), torch.full((B,), float(penalty)))


def test_uniforms_depend_only_on_seed_and_counter():
    a = uniforms(np.array([5, 6, 5]), np.array([0, 0, 0]))
    assert a[0] == a[2] and a[0] != a[1]
    alone = uniforms(np.array([6]), np.array([0]))
    assert alone[0] == a[1]
    draws = uniforms(np.full(20000, 123), np.arange(20000))
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.01 and len(np.unique(draws)) == 20000


def test_each_row_samples_as_if_alone():
    torch.manual_seed(0)
    logits = torch.randn(16, 30)
    seeds, counters = np.arange(16) * 7919, np.arange(16)
    u = torch.from_numpy(uniforms(seeds, counters))
    batch, lp = sample_next(logits, *controls(16, 0.8, 10, 0.9), None, u)
    for i in range(16):
        one, one_lp = sample_next(logits[i : i + 1], *controls(1, 0.8, 10, 0.9), None, u[i : i + 1])
        assert one.item() == batch[i].item()
        torch.testing.assert_close(one_lp, lp[i : i + 1])


def test_greedy_top_k_one_and_tiny_top_p_pick_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(8, 20)
    u = torch.rand(8, dtype=torch.float64)
    best = logits.argmax(-1)
    assert torch.equal(sample_next(logits, *controls(8, 0.0), None, u)[0], best)
    assert torch.equal(sample_next(logits, *controls(8, 1.0, top_k=1), None, u)[0], best)
    assert torch.equal(sample_next(logits, *controls(8, 1.0, top_p=1e-6), None, u)[0], best)


def test_filters_never_pick_outside_their_set_and_frequencies_follow_probabilities():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    u = torch.from_numpy(uniforms(np.full(4000, 9), np.arange(4000)))
    ids, _ = sample_next(logits, *controls(4000), None, u)
    freq = torch.bincount(ids, minlength=4).double() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.03, rtol=0)
    top2, _ = sample_next(logits, *controls(4000, top_k=2), None, u)
    assert set(top2.tolist()) == {0, 1}
    nucleus, _ = sample_next(logits, *controls(4000, top_p=0.75), None, u)  # 0.5 + 0.3 reaches 0.75
    assert set(nucleus.tolist()) == {0, 1}


def test_repetition_penalty_lowers_seen_characters():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    u = torch.tensor([0.5], dtype=torch.float64)
    ids, lp = sample_next(logits, *controls(1, 0.0, penalty=2.0), seen, u)
    assert ids.item() == 1
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[:, 1])  # log-prob under the model itself


def test_a_row_draws_the_same_whatever_the_other_rows_ask_for():
    torch.manual_seed(2)
    logits = torch.randn(6, 40)
    u = torch.from_numpy(uniforms(np.arange(6), np.zeros(6)))
    plain, _ = sample_next(logits, *controls(6), None, u)
    mixed = controls(6)
    mixed[1][3] = 5  # one other row asks for top-k ...
    mixed[2][4] = 0.5  # ... and another for a nucleus
    with_filters, _ = sample_next(logits, *mixed, None, u)
    keep = [0, 1, 2, 5]
    assert with_filters[keep].tolist() == plain[keep].tolist()


def test_the_plain_sampler_draws_by_the_cdf_in_vocabulary_order_and_takes_the_argmax_when_greedy():
    torch.manual_seed(4)
    temps = [1.0, 0.0, 0.8, 1.3, 0.0, 0.5] * 3
    B, V = len(temps), 40
    logits = torch.randn(B, V) * 3
    u = torch.from_numpy(uniforms(np.arange(B) * 7, np.arange(B)))
    temperature = torch.tensor(temps)
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    ids, lps = sample_plain(logits, scale, greedy, u)
    for i, t in enumerate(temps):  # what each row must pick, worked out alone, outside torch's sampler
        if t == 0:
            assert ids[i].item() == int(logits[i].argmax())
            continue
        cdf = np.cumsum(torch.softmax(logits[i] / t, dim=-1).double().numpy())
        assert ids[i].item() == int(np.searchsorted(cdf, u[i].item() * cdf[-1], side="right"))
    torch.testing.assert_close(lps, torch.log_softmax(logits, -1).gather(1, ids.unsqueeze(1)).squeeze(1))
    # sample_next hands such rows to it; a batch with no greedy row may skip the argmax
    assert torch.equal(sample_next(logits, *controls(B), None, u)[0],
                       sample_plain(logits, torch.ones(B), torch.zeros(B, dtype=torch.bool), u, any_greedy=False)[0])
    assert sample_plain(logits, scale, greedy, u, want_logprobs=False)[1] is None


def test_a_few_rows_take_the_same_uniforms_and_draws_as_the_vectorised_path(monkeypatch):
    """Up to SMALL_BATCH rows, uniforms and draws are worked out with Python's integers and floats; they must
    give the vectorised (numpy, torch) path's bits, whatever the seed (2**64 - 1 included) or the distribution."""
    rng = np.random.default_rng(3)
    seeds = np.concatenate([rng.integers(0, 2**63, 300, dtype=np.uint64), np.array([2**64 - 1, 0], dtype=np.uint64)])
    counters = rng.integers(0, 2**40, len(seeds), dtype=np.uint64)
    probs = torch.softmax(torch.randn(len(seeds), 65, generator=torch.Generator().manual_seed(3)) * 4, dim=-1)
    probs[::7, -5:] = 0.0  # columns no row may take
    fast_u = np.concatenate([sampling.uniforms(seeds[i : i + 2], counters[i : i + 2]) for i in range(0, len(seeds), 2)])
    fast_ids = torch.cat([sampling._draw(probs[i : i + 2], torch.from_numpy(fast_u[i : i + 2])) for i in range(0, len(seeds), 2)])
    monkeypatch.setattr(sampling, "SMALL_BATCH", 0)
    assert np.array_equal(fast_u, sampling.uniforms(seeds, counters))
    assert torch.equal(fast_ids, sampling._draw(probs, torch.from_numpy(fast_u)))
    assert torch.equal(sampling._draw(probs, torch.zeros(len(seeds), dtype=torch.float64)), (probs > 0).long().argmax(1))
