"""Cross-entropy of a text through a backend's own step (`Backend.step` + `Backend.logits`), e.g. int8.

`service.evaluate.score_chunks` scores the model's `nn.LSTM`; generation runs the fused step, which
on an int8 backend computes with int8 weights. This scores what generation computes: the same
quantity as `score_chunks` (-log p of every character after the first, the state carried from a zero
state through the whole text), one character at a time at batch 1, so the two agree to float
tolerance for an fp32 backend and the difference is the quantization's cost for an int8 one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from ..sampling import log_softmax
from ..scores import Score
from ..vocab import CharVocab, OutOfVocabularyError
from .base import Backend


def nats_of(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed -log p of each row's target. logits (N, V), targets (N,) int64."""
    return -float(np.take_along_axis(log_softmax(logits), targets[:, None], axis=1).astype(np.float64).sum())


def score_chunks_stepped(runner: Backend, vocab: CharVocab, chunks: Iterable[str]) -> Score:
    """Sum of -log p(char | all previous chars) through the backend's step, the first character excepted."""
    state = runner.zero_state(1)  # (2, L, 1, H)
    prev: int | None = None
    total, count, offset = 0.0, 0, 0
    for chunk in chunks:
        try:
            ids = vocab.encode(chunk)
        except OutOfVocabularyError as e:
            shifted = {c: [p + offset for p in ps] for c, ps in e.unknown.items()}
            raise OutOfVocabularyError(shifted) from None
        offset += len(chunk)
        for i in ids:
            if prev is not None:
                state = runner.step(np.array([prev], dtype=np.int64), state)
                total += nats_of(runner.logits(state), np.array([i], dtype=np.int64))
                count += 1
            prev = i
    return Score(nats_total=total, chars=count)


def bits_per_char_rows(backend: Backend, rows: np.ndarray) -> float:
    """Bits per character of `rows` (R, T) int64, each row scored from a zero state through the
    backend's step, all rows in one batch: a quick figure to compare backends on the same text."""
    R, T = rows.shape
    state, nats = backend.zero_state(R), 0.0  # (2, L, R, H)
    for t in range(T - 1):
        state = backend.step(np.ascontiguousarray(rows[:, t]), state)
        nats += nats_of(backend.logits(state), np.ascontiguousarray(rows[:, t + 1]))
    return nats / (R * (T - 1)) / math.log(2)
