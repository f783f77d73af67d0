"""Stop strings: end a stream at the first one and never show a client part of it."""

from __future__ import annotations


class StopMatcher:
    """Looks at the tail of the generated text after each character."""

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
