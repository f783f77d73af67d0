"""Cross-entropy of a text through a backend's own step (`Backend.step` + `Backend.logits`), e.g. int8.

`service.training.evaluate.score_chunks` scores the model's `nn.LSTM`; generation runs the fused step, which
on an int8 backend computes with int8 weights. This scores what generation computes: the same
quantity as `score_chunks` (-log p of every character after the first, the state carried from a zero
state through the whole text), one character at a time at batch 1, so the two agree to float
tolerance for an fp32 backend and the difference is the quantization's cost for an int8 one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from ..model.scores import Predict, Score, score_chunks, target_logprobs
from ..model.vocab import CharVocab
from .base import Backend


def nats_of(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed -log p of each row's target. logits (N, V), targets (N,) int64."""
    return -float(target_logprobs(logits, targets).sum())


def step_predict(runner: Backend) -> Predict:
    """The backend's own step as a scorer's `predict` (service/model/scores.py): one character at a time at
    batch 1, the state carried from a zero state."""
    state = runner.zero_state(1)  # (2, L, 1, H)

    def predict(inputs: list[int]) -> np.ndarray:
        nonlocal state
        rows = []
        for i in inputs:
            state = runner.step(np.array([i], dtype=np.int64), state)
            rows.append(runner.logits(state)[0])  # (V,)
        return np.stack(rows)  # (T, V)

    return predict


def score_chunks_stepped(runner: Backend, vocab: CharVocab, chunks: Iterable[str]) -> Score:
    """Sum of -log p(char | all previous chars) through the backend's step, the first character excepted."""
    return score_chunks(step_predict(runner), vocab, chunks)


def bits_per_char_rows(backend: Backend, rows: np.ndarray) -> float:
    """Bits per character of `rows` (R, T) int64, each row scored from a zero state through the
    backend's step, all rows in one batch: a quick figure to compare backends on the same text."""
    R, T = rows.shape
    state, nats = backend.zero_state(R), 0.0  # (2, L, R, H)
    for t in range(T - 1):
        state = backend.step(np.ascontiguousarray(rows[:, t]), state)
        nats += nats_of(backend.logits(state), np.ascontiguousarray(rows[:, t + 1]))
    return nats / (R * (T - 1)) / math.log(2)
