"""A text's score under a model: -log p of every character given all before it, in nats and bits per
character. One walk for every scorer (evaluation and calibration through the torch module, the backends'
quality check through their own step, `/score` through the engine), and no torch, so a serving install
has it.

    predict = lambda inputs: logits   # (T, V) after each input character, the state carried between calls
    score = score_chunks(predict, vocab, chunks)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..sampling import log_softmax
from .vocab import CharVocab, OutOfVocabularyError

LN2 = math.log(2.0)

Predict = Callable[[list[int]], np.ndarray]  # inputs (T,) -> logits (T, V) after each, state carried from the last call


@dataclass(frozen=True)
class Score:
    nats_total: float
    chars: int  # characters predicted: every character after the first
    unknown_chars: int = 0  # characters outside the vocabulary that were skipped or replaced

    @classmethod
    def of(cls, logprobs: Iterable[Iterable[float]], unknown_chars: int = 0) -> Score:
        """The score of the targets' log-probabilities, given in pieces: summed exactly (math.fsum)."""
        pieces = [np.asarray(p, dtype=np.float64) for p in logprobs]
        return cls(nats_total=-math.fsum(x for p in pieces for x in p.tolist()), chars=sum(p.size for p in pieces),
                   unknown_chars=unknown_chars)

    @property
    def nats_per_char(self) -> float:
        return self.nats_total / self.chars if self.chars else float("nan")

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / LN2

    def to_dict(self) -> dict:
        return {"nats_per_char": self.nats_per_char, "bits_per_char": self.bits_per_char, "chars": self.chars,
                "unknown_chars": self.unknown_chars}


def target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p of each row's target. logits (N, V), targets (N,) int -> (N,) float64."""
    return np.take_along_axis(log_softmax(logits), np.asarray(targets, dtype=np.int64)[:, None], axis=1)[:, 0].astype(np.float64)


class Windows:
    """A text in chunks as (inputs, targets) windows of at most `window` predictions each, the first character
    predicting nothing. Characters outside the vocabulary follow `unknown` (CharVocab.encode_with_policy):
    "error" raises with their positions in the whole text, "skip" drops them, "replace" reads `replacement`;
    `unknown_chars` counts those handled so far."""

    def __init__(self, vocab: CharVocab, chunks: Iterable[str], window: int = 2048, unknown: str = "error",
                 replacement: str | None = None):
        self.vocab, self.chunks, self.window = vocab, chunks, window
        self.unknown, self.replacement = unknown, replacement
        self.unknown_chars = 0

    def __iter__(self) -> Iterator[tuple[list[int], np.ndarray]]:
        prev: int | None = None  # the last character so far: the input for the next target
        offset = 0
        for chunk in self.chunks:
            try:
                ids, handled = self.vocab.encode_with_policy(chunk, self.unknown, self.replacement)
            except OutOfVocabularyError as e:
                raise OutOfVocabularyError({c: [p + offset for p in ps] for c, ps in e.unknown.items()}) from None
            offset += len(chunk)
            self.unknown_chars += handled
            for start in range(0, len(ids), self.window):
                piece = ids[start : start + self.window]
                seq = ([prev] if prev is not None else []) + piece
                prev = piece[-1]
                if len(seq) >= 2:
                    yield seq[:-1], np.asarray(seq[1:], dtype=np.int64)


def score_chunks(predict: Predict, vocab: CharVocab, chunks: Iterable[str], window: int = 2048, unknown: str = "error",
                 replacement: str | None = None) -> Score:
    """Sum of -log p(char | all previous chars) over the text, the first character excepted: the one
    scoring walk (`Windows`) with `predict`'s logits."""
    windows = Windows(vocab, chunks, window, unknown, replacement)
    sums, chars = [], 0  # one exact sum a window, so a text of any length scores in constant memory
    for inputs, targets in windows:
        window_score = Score.of([target_logprobs(predict(inputs), targets)])
        sums.append(window_score.nats_total)
        chars += window_score.chars
    return Score(nats_total=math.fsum(sums), chars=chars, unknown_chars=windows.unknown_chars)


def logits_of(predict: Predict, vocab: CharVocab, text: str, window: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Every next-character prediction over `text` by the same walk: logits (N, V) and targets (N,), N = len(text) - 1."""
    pairs = [(predict(inputs), targets) for inputs, targets in Windows(vocab, [text], window)]
    if not pairs:
        raise ValueError("a text of at least two characters is needed")
    return np.concatenate([p for p, _ in pairs]), np.concatenate([t for _, t in pairs])
