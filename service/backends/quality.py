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

import torch

from ..evaluate import Score
from ..vocab import CharVocab, OutOfVocabularyError
from .base import Backend


@torch.inference_mode()
def score_chunks_stepped(runner: Backend, vocab: CharVocab, chunks: Iterable[str], window: int = 4096) -> Score:
    """Sum of -log p(char | all previous chars) through the backend's step, the first character excepted."""
    state = runner.zero_state(1)  # (2, L, 1, H)
    logits = torch.empty(window, runner.vocab_size)  # (W, V): the predictions of one window
    targets: list[int] = []
    prev: int | None = None
    total, count, offset = 0.0, 0, 0

    def flush() -> float:
        n = len(targets)
        nll = torch.nn.functional.cross_entropy(logits[:n], torch.tensor(targets), reduction="sum")
        targets.clear()
        return float(nll)

    for chunk in chunks:
        try:
            ids = vocab.encode(chunk)
        except OutOfVocabularyError as e:
            shifted = {c: [p + offset for p in ps] for c, ps in e.unknown.items()}
            raise OutOfVocabularyError(shifted) from None
        offset += len(chunk)
        for i in ids:
            if prev is not None:
                state = runner.step(torch.tensor([prev]), state)
                logits[len(targets)] = runner.logits(state)[0]  # (V,)
                targets.append(i)
                count += 1
                if len(targets) == window:
                    total += flush()
            prev = i
    if targets:
        total += flush()
    return Score(nats_total=total, chars=count)


@torch.inference_mode()
def bits_per_char_rows(backend: Backend, rows: torch.Tensor) -> float:
    """Bits per character of `rows` (R, T) int64, each row scored from a zero state through the
    backend's step, all rows in one batch: a quick figure to compare backends on the same text."""
    R, T = rows.shape
    state, nats = backend.zero_state(R), 0.0  # (2, L, R, H)
    for t in range(T - 1):
        state = backend.step(rows[:, t], state)
        nats += float(torch.nn.functional.cross_entropy(backend.logits(state), rows[:, t + 1], reduction="sum"))
    return nats / (R * (T - 1)) / math.log(2)
