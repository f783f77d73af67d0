"""The Batch: rows leave with filter, join with concatenate, and every per-row array follows its row."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import numpy as np

from service.engine.batch import CONTROL_DTYPES, Batch
from service.engine.types import GenerationRequest
from service.sampling import SamplingParams

L, H, V = 2, 4, 7


def row(tag: int, **params) -> tuple[SimpleNamespace, Batch]:
    request = GenerationRequest(prompt_ids=[tag % V, (tag + 2) % V], max_new_tokens=5, params=SamplingParams(**params))
    r = SimpleNamespace(request=request, tag=tag)
    return r, Batch.single(r, np.full((2, L, H), float(tag), dtype=np.float32), seed=100 + tag, counter=tag, vocab_size=V)


def test_every_sampling_control_has_a_tensor_of_its_type():
    assert set(CONTROL_DTYPES) == {f.name for f in fields(SamplingParams)}
    _, b = row(3, temperature=0.5, top_k=4, top_p=0.9, repetition_penalty=1.3)
    assert b.controls["top_k"].dtype == np.int64 and b.controls["temperature"].dtype == np.float32
    assert b.controls["top_k"].tolist() == [4] and abs(b.controls["top_p"].item() - 0.9) < 1e-6
    assert np.flatnonzero(b.seen[0]).tolist() == [3, 5]  # the prompt's characters
    assert b.penalised


def test_concatenate_then_filter_keeps_each_row_with_its_own_values():
    singles = [row(t, temperature=t / 10, top_k=t) for t in range(1, 6)]
    batch = Batch.concatenate([Batch.empty(L, H, V), *(b for _, b in singles)])
    assert len(batch) == 5 and batch.state.shape == (2, L, 5, H)
    kept = batch.filter([4, 1, 2])
    assert [r.tag for r in kept.rows] == [5, 2, 3]
    assert kept.state[0, 0, :, 0].tolist() == [5.0, 2.0, 3.0]
    assert kept.controls["top_k"].tolist() == [5, 2, 3]
    assert kept.seeds.tolist() == [105, 102, 103] and kept.counters.tolist() == [5, 2, 3]
    assert np.array_equal(kept.seen, batch.seen[[4, 1, 2]])
    again = Batch.concatenate([kept, singles[0][1]])  # a row joins the survivors
    assert [r.tag for r in again.rows] == [5, 2, 3, 1] and again.controls["temperature"].tolist()[-1] == np.float32(0.1)


def test_filter_to_nothing_and_record_draws():
    _, a = row(1)
    _, b = row(2, repetition_penalty=1.5)
    batch = Batch.concatenate([a, b])
    batch.record(np.array([6, 0], dtype=np.int64))
    assert batch.counters.tolist() == [2, 3]
    assert bool(batch.seen[0, 6]) and bool(batch.seen[1, 0])
    empty = batch.filter([])
    assert len(empty) == 0 and empty.state.shape == (2, L, 0, H) and not empty.penalised


def test_without_a_penalty_the_seen_mask_is_left_alone():
    _, a = row(1)
    before = a.seen.copy()
    a.record(np.array([6], dtype=np.int64))
    assert np.array_equal(a.seen, before) and a.counters.tolist() == [2]
