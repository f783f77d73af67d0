"""Cross-entropy of a text under the torch module, in one streaming pass with the state carried throughout
(the walk is service/model/scores.py's, shared with every other scorer)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..model import scores
from ..model.network import CharLSTM, State
from ..model.scores import LN2, Predict, Score  # noqa: F401 (evaluation's result; its home needs no torch)
from ..model.vocab import CharVocab


def read_chunks(path: str | Path, size: int = 1 << 16) -> Iterator[str]:
    """A UTF-8 file as text chunks, so a file of any length streams in constant memory."""
    with open(path, encoding="utf-8", newline="") as f:
        while chunk := f.read(size):
            yield chunk


def module_predict(model: CharLSTM) -> Predict:
    """The torch module as a scorer's `predict` (service/model/scores.py): windows in order, the state carried."""
    model.eval()
    device = next(model.parameters()).device
    state: State | None = None

    @torch.no_grad()
    def predict(inputs: list[int]) -> np.ndarray:
        nonlocal state
        logits, state = model(torch.tensor(inputs, dtype=torch.long, device=device).unsqueeze(0), state)  # (1, T, V)
        return logits[0].float().cpu().numpy()  # (T, V)

    return predict


def score_chunks(model: CharLSTM, vocab: CharVocab, chunks: Iterable[str], window: int = 2048,
                 unknown: str = "error", replacement: str | None = None) -> Score:
    """Sum of -log p(char | all previous chars) over the stream through the module, the first character
    excepted (`scores.score_chunks`, whose `unknown` policy this takes)."""
    return scores.score_chunks(module_predict(model), vocab, chunks, window, unknown, replacement)


def score_text(model: CharLSTM, vocab: CharVocab, text: str, window: int = 2048) -> Score:
    return score_chunks(model, vocab, [text], window)


@torch.no_grad()
def score_parallel(model: CharLSTM, ids: torch.Tensor, streams: int = 16, window: int = 512) -> float:
    """Mean nats/char with the text cut into `streams` contiguous segments run side by side.

    A quick estimate for periodic validation during training (each segment starts from a zero state);
    the figure a model card reports comes from `score_chunks`, one pass over the whole text.
    """
    if ids.numel() < 2:
        raise ValueError(f"cannot score {ids.numel()} character(s): at least 2 are needed")
    streams = min(streams, ids.numel() - 1)  # a short text gets fewer streams, never zero-length ones
    was_training = model.training
    model.eval()
    n = (ids.numel() - 1) // streams
    x = ids[: streams * n].view(streams, n)  # (S, n)
    y = ids[1 : streams * n + 1].view(streams, n)  # (S, n)
    state, total = None, 0.0
    for start in range(0, n, window):
        logits, state = model(x[:, start : start + window], state)  # (S, W, V)
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y[:, start : start + window].reshape(-1), reduction="sum"))
    model.train(was_training)
    return total / (streams * n)
