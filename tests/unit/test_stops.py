"""Stop strings (service/engine/stops.py): a look's text searched at once finds the stop string that a check
after each character finds, at the same character."""

from __future__ import annotations

import random

from service.engine.stops import StopMatcher


def first_by_checks(matcher: StopMatcher, text: str, new_from: int) -> tuple[int, int] | None:
    """(end, length) of the stop string `check` finds first, character by character from `new_from`."""
    for end in range(new_from + 1, len(text) + 1):
        held, stop_len = matcher.check(text[max(0, end - matcher.longest) : end])
        if stop_len:
            return end, stop_len
    return None


def test_first_in_finds_what_a_check_after_each_character_finds():
    rng = random.Random(7)
    found = ties = 0
    for _ in range(3000):
        stops = tuple("".join(rng.choice("ab ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4)))
        matcher = StopMatcher(stops)
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 12)))
        new_from = rng.randint(0, len(text))
        if first_by_checks(matcher, text[:new_from], 0) is not None:
            continue  # a stop string ended before the new text: the stream would have ended there
        want = first_by_checks(matcher, text, new_from)
        assert matcher.first_in(text, new_from) == want, (stops, text, new_from)
        if want is not None:
            found += 1
            ties += sum(text[: want[0]].endswith(s) for s in matcher.stops) > 1  # several end at that character
    assert found > 500 and ties > 10
