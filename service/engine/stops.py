"""Stop strings: end a stream at the first one and never show a client part of it."""

from __future__ import annotations


class StopMatcher:
    """Looks at the tail of the generated text after each character, or over a look's characters at once."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.longest = max((len(s) for s in self.stops), default=0)

    def check(self, tail: str) -> tuple[int, int]:
        """`tail`: the last `longest` (or fewer) characters. Returns (held, stop_len).

        stop_len > 0: the text ends with a stop string of that length, which ends the stream.
        Otherwise `held` trailing characters could still grow into a stop string and must wait.
        """
        for s in self.stops:
            if tail.endswith(s):
                return 0, len(s)
        for k in range(min(self.longest - 1, len(tail)), 0, -1):
            suffix = tail[-k:]
            if any(s.startswith(suffix) for s in self.stops):
                return k, 0
        return 0, 0

    def first_in(self, text: str, new_from: int) -> tuple[int, int] | None:
        """The first stop string that ends in `text` at `new_from` or later (none ended before it): (where it
        ends, exclusive, its length); the earliest end wins, and the first-listed stop of those ending
        there, as `check` after each character would have found. None when none ends there."""
        found = None
        for s in self.stops:
            at = text.find(s, max(0, new_from - len(s) + 1))
            if at >= 0 and (found is None or at + len(s) < found[0]):
                found = (at + len(s), len(s))
        return found

