"""Cross-entropy of a text through the engine's own step (`Runner.step` + `Runner.logits`), e.g. int8.

`service.evaluate.score_chunks` scores the model's `nn.LSTM`; generation runs the fused step, which
under `quantize="int8"` computes with int8 weights. This scores what generation computes: the same
quantity as `score_chunks` (-log p of every character after the first, the state carried from a zero
state through the whole text), one character at a time at batch 1, so the two agree to float
tolerance for an fp32 runner and the difference is the quantization's cost for an int8 one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..evaluate import Score
from ..vocab import CharVocab, OutOfVocabularyError
from .runner import Runner


@torch.inference_mode()
def score_chunks_stepped(runner: Runner, vocab: CharVocab, chunks: Iterable[str], window: int = 4096) -> Score:
    """Sum of -log p(char | all previous chars) through the runner's step, the first character excepted."""
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
