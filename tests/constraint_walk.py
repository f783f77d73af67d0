"""Random rows through a compiled constraint, moved as the engine moves them (tests and benchmarks)."""

from __future__ import annotations

import numpy as np


def random_text(constraint, chars: list[str], rng: np.random.Generator, limit: int = 400) -> str | None:
    """The text a row writes that draws at random among what its automaton allows (a newline now and
    then, where allowed: in JSON it closes strings); None if it has not ended within `limit` draws."""
    newline = chars.index("\n")
    state, text = 0, constraint.prefix
    for _ in range(limit):
        allowed = np.flatnonzero(~constraint.forbid[state])
        char = newline if rng.random() < 0.1 and not constraint.forbid[state][newline] else int(rng.choice(allowed))
        nxt = int(constraint.next[state, char])
        if nxt < 0:  # a character the text may end before: it is cut
            return text
        text += constraint.pieces.get((state, char), chars[char])
        state = nxt
        if constraint.terminal[state]:
            return text
    return None
