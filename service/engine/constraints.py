"""Constrained output: a character automaton that says, row by row, which characters may come next.

A token is one character, so a regular expression's automaton over characters masks the logits
directly (vLLM's structured outputs and llama.cpp's grammars need a token-level index; this does not).
`interegular` parses the pattern into a deterministic automaton; a list of choices becomes a trie.
Either compiles to a `Constraint`: per state, the vocabulary characters that keep the text on a path to
a full match, and the state each leads to. States from which no match can be reached with the
vocabulary are cut away, so a row never paints itself into a corner.

A character model has no end-of-text token, so the end is the model's choice too: in a state where the
text so far is a full match and it could go on, every character is allowed, and one that the pattern
does not allow there ends the row before it (as a stop string would: it is not part of the text). A
state with nothing after it ends the row after its character. Either end is finish_reason "stop".
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass

import numpy as np
import torch

MAX_PATTERN_CHARS = 1000  # a pattern's length (the OpenAPI bound)
MAX_STATES = 4096  # a compiled automaton's states: beyond this the pattern is refused as too large
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 256


class ConstraintError(ValueError):
    """A pattern or a choice list that cannot serve: it does not parse, is too large, or no text in the
    model's vocabulary matches it."""


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled automaton over the vocabulary's ids. S states, V characters; state 0 is the start."""

    kind: str  # "regex" or "choice": what the client sent
    source: str  # the pattern, or the choices joined, for messages
    forbid: torch.Tensor  # (S, V) bool: characters a row in each state may not write (none in a state that may end)
    next: np.ndarray  # (S, V) int32: the state a character leads to; -1: it is no step of the pattern (it ends a match)
    terminal: np.ndarray  # (S,) bool: nothing may follow (the row ends after the character that led here)

    @property
    def states(self) -> int:
        return self.next.shape[0]


def _build(kind: str, source: str, transitions: list[dict[int, int]], finals: set[int], vocab_size: int) -> Constraint:
    """From raw transitions (state -> {char id: state}, state 0 the start) to a Constraint over the states
    that the start reaches and that can still reach a final state."""
    into: list[list[int]] = [[] for _ in transitions]  # reverse edges
    for s, edges in enumerate(transitions):
        for t in set(edges.values()):
            into[t].append(s)
    live, frontier = set(finals), list(finals)
    while frontier:  # every state from which a final state can be reached
        for s in into[frontier.pop()]:
            if s not in live:
                live.add(s)
                frontier.append(s)
    if 0 not in live:
        raise ConstraintError(f"{kind}: no text made of the model's characters matches {source!r}")
    reached, frontier = {0}, [0]
    while frontier:  # and that the start reaches through live states
        for t in transitions[frontier.pop()].values():
            if t in live and t not in reached:
                reached.add(t)
                frontier.append(t)
    live &= reached
    order = {s: i for i, s in enumerate(sorted(live))}  # the start stays 0
    S = len(order)
    nxt = np.full((S, vocab_size), -1, dtype=np.int32)  # (S, V)
    for s, i in order.items():
        for c, t in transitions[s].items():
            if t in order:
                nxt[i, c] = order[t]
    final = np.zeros(S, dtype=bool)
    final[[order[s] for s in finals if s in order]] = True
    may_continue = (nxt >= 0).any(axis=1)  # (S,)
    forbid = torch.from_numpy((nxt < 0) & ~final[:, None])  # (S, V): an ending state allows everything
    return Constraint(kind, source, forbid, nxt, ~may_continue)


def regex_transitions(pattern: str, chars: list[str]) -> tuple[list[dict[int, int]], set[int]]:
    """interegular's automaton of `pattern` over the vocabulary's ids: (transitions, finals), state 0 the
    start. Runs in the compile process (`compile_regex`): determinising a pattern can take exponential time."""
    import interegular

    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as e:  # interegular's parse errors have no common base class
        why = str(e).strip() or "the pattern does not parse (check its brackets, escapes and repetitions)"
        raise ConstraintError(f"regex: {pattern!r} cannot be compiled: {type(e).__name__}: {why}") from None
    if len(fsm.states) > MAX_STATES:
        raise ConstraintError(f"regex: {pattern!r} compiles to {len(fsm.states)} states, more than {MAX_STATES}")
    index = {s: i for i, s in enumerate([fsm.initial, *sorted(s for s in fsm.states if s != fsm.initial)])}
    symbols = [fsm.alphabet[c] for c in chars]  # each vocabulary character's symbol class
    transitions: list[dict[int, int]] = [{} for _ in index]
    for s, edges in fsm.map.items():
        for c, symbol in enumerate(symbols):
            if symbol in edges:
                transitions[index[s]][c] = index[edges[symbol]]
    return transitions, {index[s] for s in fsm.finals}


class _Compiler:
    """One child process that compiles patterns, killed and replaced when a pattern overruns its deadline
    (a thread cannot be stopped, and a pattern like `(a|b)*a(a|b){14}` takes most of a minute)."""

    def __init__(self):
        self._pool = None
        self._lock = threading.Lock()

    def run(self, pattern: str, chars: list[str], timeout_s: float):
        import multiprocessing

        with self._lock:  # one pattern at a time: the child is one core's worth of work
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            job = self._pool.apply_async(regex_transitions, (pattern, chars))
            try:
                return job.get(timeout_s)
            except multiprocessing.TimeoutError:
                self._pool.terminate()
                self._pool = None
                raise ConstraintError(f"regex: {pattern!r} did not compile within {timeout_s:g} s: "
                                      "write a smaller pattern") from None

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None


COMPILER = _Compiler()
atexit.register(COMPILER.close)  # a pool left to the interpreter's teardown complains as it goes
COMPILE_TIMEOUT_S = 3.0


def compile_regex(pattern: str, chars: list[str], timeout_s: float = COMPILE_TIMEOUT_S) -> Constraint:
    """A regular expression the whole generated text must match (Python's syntax, as interegular reads
    it). chars: the vocabulary, by id. Blocks for up to `timeout_s` (call it off the event loop)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConstraintError(f"regex: {len(pattern)} characters is more than {MAX_PATTERN_CHARS}")
    transitions, finals = COMPILER.run(pattern, chars, timeout_s)
    return _build("regex", pattern, transitions, finals, len(chars))


def compile_choices(choices: list[str], chars: list[str]) -> Constraint:
    """The generated text is exactly one of `choices` (a trie over their characters)."""
    if not choices or len(choices) > MAX_CHOICES:
        raise ConstraintError(f"choice: give 1 to {MAX_CHOICES} choices")
    ids = {c: i for i, c in enumerate(chars)}
    transitions: list[dict[int, int]] = [{}]
    finals = set()
    for n, choice in enumerate(choices):
        if not choice or len(choice) > MAX_CHOICE_CHARS:
            raise ConstraintError(f"choice.{n}: a choice has 1 to {MAX_CHOICE_CHARS} characters")
        unknown = sorted({c for c in choice if c not in ids})
        if unknown:
            raise ConstraintError(f"choice.{n}: {choice!r} can never be written: {', '.join(map(repr, unknown))} "
                                  "is not in the model's vocabulary")
        s = 0
        for c in choice:
            c = ids[c]
            if c not in transitions[s]:
                transitions[s][c] = len(transitions)
                transitions.append({})
            s = transitions[s][c]
        finals.add(s)
    return _build("choice", " | ".join(choices), transitions, finals, len(chars))
