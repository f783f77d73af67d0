"""Character vocabulary: the model's alphabet, stored with every model so ids never drift."""

from __future__ import annotations

from dataclasses import dataclass, field


class OutOfVocabularyError(ValueError):
    """Raised for text holding characters the model has never seen; names them and where they are."""

    def __init__(self, unknown: dict[str, list[int]]):
        self.unknown = unknown
        parts = []
        for ch, positions in unknown.items():
            shown = ", ".join(str(p) for p in positions[:5]) + (", ..." if len(positions) > 5 else "")
            parts.append(f"{ch!r} (U+{ord(ch):04X}) at position {shown}")
        super().__init__("text contains characters outside the model's vocabulary: " + "; ".join(parts))


@dataclass(frozen=True)
class CharVocab:
    """An ordered set of characters; the id of a character is its index."""

    chars: str
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be unique")
        if not self.chars:
            raise ValueError("vocabulary must not be empty")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self._index

    def unknown_chars(self, text: str) -> dict[str, list[int]]:
        """Characters of `text` outside the vocabulary, each with its positions (empty when all known)."""
        unknown: dict[str, list[int]] = {}
        if all(c in self._index for c in set(text)):
            return unknown
        for pos, ch in enumerate(text):
            if ch not in self._index:
                unknown.setdefault(ch, []).append(pos)
        return unknown

    def encode(self, text: str) -> list[int]:
        index = self._index
        try:
            return [index[c] for c in text]
        except KeyError:
            raise OutOfVocabularyError(self.unknown_chars(text)) from None

    def encode_with_policy(self, text: str, unknown: str = "error", replacement: str | None = None) -> tuple[list[int], int]:
        """Encode under a policy for characters outside the vocabulary: "error" raises
        OutOfVocabularyError, "skip" drops them, "replace" puts `replacement` (itself in the vocabulary)
        in their place. Returns (ids, how many characters were skipped or replaced)."""
        if unknown == "error":
            return self.encode(text), 0
        index = self._index
        if unknown == "replace":
            if replacement is None or len(replacement) != 1 or replacement not in index:
                raise ValueError(f"replacement must be one character of the vocabulary, got {replacement!r}")
            fill = index[replacement]
            ids = [index.get(c, fill) for c in text]
            return ids, sum(1 for c in text if c not in index)
        if unknown == "skip":
            ids = [index[c] for c in text if c in index]
            return ids, len(text) - len(ids)
        raise ValueError(f"unknown-character policy must be error, skip or replace, got {unknown!r}")

    def decode(self, ids) -> str:
        chars = self.chars
        return "".join(chars[i] for i in ids)
