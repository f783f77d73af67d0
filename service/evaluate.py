"""Cross-entropy of a text under a model, in one streaming pass with the state carried throughout."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .model import CharLSTM, State
from .scores import LN2, Score  # noqa: F401 (evaluation's result; its home needs no torch)
from .vocab import CharVocab, OutOfVocabularyError

def read_chunks(path: str | Path, size: int = 1 << 16) -> Iterator[str]:
    """A UTF-8 file as text chunks, so a file of any length streams in constant memory."""
    with open(path, encoding="utf-8", newline="") as f:
        while chunk := f.read(size):
            yield chunk


@torch.no_grad()
def score_chunks(model: CharLSTM, vocab: CharVocab, chunks: Iterable[str], window: int = 2048,
                 unknown: str = "error", replacement: str | None = None) -> Score:
    """Sum of -log p(char | all previous chars) over the stream, the first character excepted.

    Characters outside the vocabulary follow `unknown` (CharVocab.encode_with_policy): "error" raises
    with their positions in the whole stream, "skip" drops them, "replace" scores `replacement` instead.
    """
    model.eval()
    device = next(model.parameters()).device
    state: State | None = None
    prev: int | None = None  # last character of the previous window: the input for the next target
    total, count, offset, handled = 0.0, 0, 0, 0
    for chunk in chunks:
        try:
            ids, n_unknown = vocab.encode_with_policy(chunk, unknown, replacement)
        except OutOfVocabularyError as e:
            shifted = {c: [p + offset for p in ps] for c, ps in e.unknown.items()}
            raise OutOfVocabularyError(shifted) from None
        offset += len(chunk)
        handled += n_unknown
        for start in range(0, len(ids), window):
            piece = ids[start : start + window]
            seq = ([prev] if prev is not None else []) + piece
            prev = piece[-1]
            if len(seq) < 2:
                continue
            t = torch.tensor(seq, dtype=torch.long, device=device).unsqueeze(0)  # (1, T+1)
            logits, state = model(t[:, :-1], state)  # (1, T, V)
            nll = torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="sum")
            total += float(nll)
            count += t.size(1) - 1
    return Score(nats_total=total, chars=count, unknown_chars=handled)


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
