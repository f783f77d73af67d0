"""A text's score under a model: nats and bits per character. No torch, so a serving install has it."""

from __future__ import annotations

import math
from dataclasses import dataclass

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Score:
    nats_total: float
    chars: int  # characters predicted: every character after the first
    unknown_chars: int = 0  # characters outside the vocabulary that were skipped or replaced

    @property
    def nats_per_char(self) -> float:
        return self.nats_total / self.chars if self.chars else float("nan")

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / LN2

    def to_dict(self) -> dict:
        return {"nats_per_char": self.nats_per_char, "bits_per_char": self.bits_per_char, "chars": self.chars,
                "unknown_chars": self.unknown_chars}
