"""Corpus: read any UTF-8 text file, fingerprint it, split it train/validation by position."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# The convention of the published tiny-shakespeare baselines: first 90% train, last 10% validation.
DEFAULT_TRAIN_FRACTION = 0.9


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    sha256: str

    @classmethod
    def read(cls, path: str | Path) -> "Corpus":
        path = Path(path)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None
        if len(text) < 2:
            raise ValueError(f"{path} holds {len(text)} characters; a corpus needs at least 2")
        return cls(name=path.name, text=text, sha256=hashlib.sha256(raw).hexdigest())

    def split(self, train_fraction: float = DEFAULT_TRAIN_FRACTION) -> tuple[str, str]:
        """(train, validation): a split by position, never shuffled, so validation is unseen text."""
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        cut = int(len(self.text) * train_fraction)
        return self.text[:cut], self.text[cut:]

    def split_as_trained(self, card: dict) -> tuple[str, str]:
        """(train, validation) cut where `charlstm train` cut them for the model of `card`: only that
        model's own training text (its checksum in the card) has such parts."""
        trained_on = card.get("corpus", {})
        if "split" not in trained_on or trained_on.get("sha256") != self.sha256:
            raise ValueError(f"{self.name} is not the text this model was trained on ({trained_on.get('name', 'unknown')}, "
                             f"sha256 {str(trained_on.get('sha256', '?'))[:12]}...)")
        return self.split(trained_on["split"]["train_fraction"])

    def describe(self, train_fraction: float) -> dict:
        train, val = self.split(train_fraction)
        return {
            "name": self.name,
            "chars": len(self.text),
            "sha256": self.sha256,
            "split": {"train_fraction": train_fraction, "train_chars": len(train), "val_chars": len(val)},
        }
