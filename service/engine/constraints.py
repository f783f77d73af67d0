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
from dataclasses import dataclass, field

import numpy as np

MAX_PATTERN_CHARS = 1000  # a pattern's length (the OpenAPI bound)
MAX_STATES = 4096  # a compiled automaton's states: beyond this the pattern is refused as too large
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 256


class ConstraintError(ValueError):
    """A pattern or a choice list that cannot serve: it does not parse, is too large, or no text in the
    model's vocabulary matches it."""


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled automaton over the vocabulary's ids. S states, V characters; `start` is the first state."""

    kind: str  # "regex", "choice" or "json": what the client sent
    source: str  # the pattern, or the choices joined, for messages
    forbid: np.ndarray  # (S, V) bool: characters a row in each state may not write (none in a state that may end)
    next: np.ndarray  # (S, V) int32: the state a character leads to; -1: it is no step of the pattern (it ends a match)
    terminal: np.ndarray  # (S,) bool: nothing may follow (the row ends after the character that led here)
    start: int = 0
    prefix: str = ""  # characters the pattern writes before the model's first (json: characters outside the vocabulary)
    pieces: dict[tuple[int, int], str] = field(default_factory=dict)  # (state, id) -> what writing id there puts in the text, where that is not the character itself

    @property
    def states(self) -> int:
        return self.next.shape[0]


def _into(transitions: list[dict[int, int]]) -> list[list[int]]:
    """The reverse edges: per state, the states with a character that leads to it."""
    into: list[list[int]] = [[] for _ in transitions]
    for s, edges in enumerate(transitions):
        for t in set(edges.values()):
            into[t].append(s)
    return into


def _live(transitions: list[dict[int, int]], finals: set[int]) -> set[int]:
    """Every state from which a final state can be reached through `transitions`."""
    into = _into(transitions)
    live, frontier = set(finals), list(finals)
    while frontier:
        for s in into[frontier.pop()]:
            if s not in live:
                live.add(s)
                frontier.append(s)
    return live


def _distances(transitions: list[dict[int, int]], finals: set[int]) -> dict[int, int]:
    """Each state's fewest characters to a final state (breadth first, backwards)."""
    into = _into(transitions)
    dist, frontier = {f: 0 for f in finals}, list(finals)
    while frontier:
        nxt = []
        for t in frontier:
            for s in into[t]:
                if s not in dist:
                    dist[s] = dist[t] + 1
                    nxt.append(s)
        frontier = nxt
    return dist


def _moves(transitions: list[dict[int, int]], finals: set[int], alphabet: list[str], vocab_size: int,
           prefer: str = "") -> tuple[list[dict[int, int]], dict[int, str]]:
    """The moves a row can make when characters from `vocab_size` on are outside the model's vocabulary.

    The model writes only its own characters; a character outside them is written for it (jump-forward):
    - a state with none of the model's characters and no end (after `{`, only `"` may follow) is forced:
      it writes an outside character: the first of `prefer` that may follow, else the one closest to a match;
    - a state with both may take the outside character when the model writes one of its own that the
      pattern does not allow there; the model's character follows it where it may (after `{` a letter
      opens a key with that letter), else it is dropped (inside a JSON string a newline, which a string
      cannot hold, closes it).
    Returns, per state, char id -> next state, with an outside move keyed by -1, and each outside move's character."""
    rank = {c: i for i, c in enumerate(prefer)}
    live = _live(transitions, finals)
    for _ in range(16):  # each pass may find states that only the outside moves kept alive: until nothing changes
        dist = _distances([{c: t for c, t in e.items() if t in live} for e in transitions], finals)
        moves: list[dict[int, int]] = []
        chosen: dict[int, str] = {}
        for s, edges in enumerate(transitions):
            own = {c: t for c, t in edges.items() if c < vocab_size and t in live}
            outside = [(rank.get(alphabet[c], len(rank)), dist.get(t, 1 << 30), c, t)
                       for c, t in edges.items() if c >= vocab_size and t in live]
            if outside and s not in finals and len(own) < vocab_size:
                _, _, c, own[-1] = min(outside)
                chosen[s] = alphabet[c]
            moves.append(own)
        again = _live(moves, finals) & live
        if again == live:
            break
        live = again
    return moves, chosen


def _build(kind: str, source: str, transitions: list[dict[int, int]], finals: set[int], alphabet: list[str],
           vocab_size: int, prefer: str = "") -> Constraint:
    """From raw transitions (state -> {char id: state}, state 0 the start; ids from `vocab_size` on are
    characters outside the model's vocabulary) to a Constraint over the states where the model chooses."""
    extended = len(alphabet) > vocab_size
    if extended:
        moves, outside_char = _moves(transitions, finals, alphabet, vocab_size, prefer)
    else:
        moves, outside_char = transitions, {}
    live = _live(moves, finals)

    def forced(s: int) -> bool:  # the model has no choice here: the outside character is written for it
        return extended and s not in finals and -1 in moves[s] and len(moves[s]) == 1

    def land(s: int) -> tuple[str, int]:  # follow forced moves: (what they write, the state where they stop)
        run, seen = [], set()
        while forced(s):
            if s in seen:
                raise ConstraintError(f"{kind}: {source!r} writes characters outside the model's vocabulary forever")
            seen.add(s)
            run.append(outside_char[s])
            s = moves[s][-1]
        return "".join(run), s

    prefix, start = land(0)
    if start not in live:
        raise ConstraintError(f"{kind}: no text made of the model's characters matches {source!r}")
    order, frontier = {start: 0}, [start]  # the start becomes state 0
    while frontier:  # every state where the model chooses that the start reaches
        s = frontier.pop()
        for t in moves[s].values():
            t = land(t)[1] if t in live else None
            if t is not None and t not in order:
                order[t] = len(order)
                frontier.append(t)
    S = len(order)
    nxt = np.full((S, vocab_size), -1, dtype=np.int32)  # (S, V)
    final = np.zeros(S, dtype=bool)
    exits = np.zeros(S, dtype=bool)  # a character the pattern does not allow takes the outside move
    pieces: dict[tuple[int, int], str] = {}
    for s, i in order.items():
        final[i] = s in finals
        outside = moves[s].get(-1)
        for c, t in moves[s].items():
            if c >= 0 and t in live:
                run, landing = land(t)
                nxt[i, c] = order[landing]
                if run:
                    pieces[(i, c)] = alphabet[c] + run
        if outside is not None and outside in live:
            exits[i] = True
            run, landing = land(outside)
            for c in map(int, np.flatnonzero(nxt[i] < 0)):  # the outside character, then the model's where it may follow
                after = moves[landing].get(c)
                if after is not None and after in live:
                    run2, end = land(after)
                    nxt[i, c], pieces[(i, c)] = order[end], outside_char[s] + run + alphabet[c] + run2
                else:
                    nxt[i, c], pieces[(i, c)] = order[landing], outside_char[s] + run
    may_continue = (nxt >= 0).any(axis=1)  # (S,)
    forbid = (nxt < 0) & ~final[:, None] & ~exits[:, None]  # (S, V): an ending state allows everything
    return Constraint(kind, source, forbid, nxt, ~may_continue, 0, prefix, pieces)


def regex_transitions(pattern: str, chars: list[str], outside: bool = False, name: str | None = None
                      ) -> tuple[list[dict[int, int]], set[int], list[str]]:
    """interegular's automaton of `pattern` over the vocabulary's ids: (transitions, finals, alphabet),
    state 0 the start. With `outside`, the alphabet goes on past the vocabulary with the printable ASCII
    characters the pattern names (`_moves`). Runs in the compile process (`compile_regex`):
    determinising a pattern can take exponential time."""
    import interegular

    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as e:  # interegular's parse errors have no common base class
        why = str(e).strip() or "the pattern does not parse (check its brackets, escapes and repetitions)"
        raise ConstraintError(f"{name or f'regex: {pattern!r}'} cannot be compiled: {type(e).__name__}: {why}") from None
    if len(fsm.states) > MAX_STATES:
        raise ConstraintError(f"{name or f'regex: {pattern!r}'} compiles to {len(fsm.states)} states, more than {MAX_STATES}")
    index = {s: i for i, s in enumerate([fsm.initial, *sorted(s for s in fsm.states if s != fsm.initial)])}
    alphabet = list(chars)
    if outside:
        alphabet += sorted(c for c in fsm.alphabet if isinstance(c, str) and len(c) == 1 and " " <= c <= "~"
                           and c not in set(chars))
    symbols = [fsm.alphabet[c] for c in alphabet]  # each character's symbol class
    transitions: list[dict[int, int]] = [{} for _ in index]
    for s, edges in fsm.map.items():
        for c, symbol in enumerate(symbols):
            if symbol in edges:
                transitions[index[s]][c] = index[edges[symbol]]
    return transitions, {index[s] for s in fsm.finals}, alphabet


class _Compiler:
    """One child process that compiles patterns, killed and replaced when a pattern overruns its deadline
    (a thread cannot be stopped, and a pattern like `(a|b)*a(a|b){14}` takes most of a minute)."""

    def __init__(self):
        self._pool = None
        self._lock = threading.Lock()

    def run(self, pattern: str, chars: list[str], timeout_s: float, outside: bool = False, name: str | None = None):
        import multiprocessing

        with self._lock:  # one pattern at a time: the child is one core's worth of work
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(1)
            job = self._pool.apply_async(regex_transitions, (pattern, chars, outside, name))
            try:
                return job.get(timeout_s)
            except multiprocessing.TimeoutError:
                self._pool.terminate()
                self._pool = None
                raise ConstraintError(f"{name or f'regex: {pattern!r}'} did not compile within {timeout_s:g} s: "
                                      f"write a smaller {'schema' if name else 'pattern'}") from None

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
    transitions, finals, alphabet = COMPILER.run(pattern, chars, timeout_s)
    return _build("regex", pattern, transitions, finals, alphabet, len(chars))


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
    return _build("choice", " | ".join(choices), transitions, finals, list(chars), len(chars))


# JSON: a schema becomes a regular expression (outlines-core, chosen by measurement: benchmarks/README.md), and
# that an automaton like any pattern's. Its braces, quotes and digits are outside this model's vocabulary, so
# the automaton writes them for the model (`_moves`).
JSON_PREFER = '"}]'  # where the model writes none of its own characters: open a string, else close, else the nearest end
JSON_WHITESPACE = r"[ ]?"  # at most one space between tokens: a model cannot pad its answer with blank lines
MAX_JSON_PATTERN_CHARS = 50_000  # the schema's regular expression; beyond it the schema is refused as too large
_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
ANY_OBJECT = {"type": "object", "additionalProperties": {"anyOf": [
    *_SCALAR["anyOf"], {"type": "array", "items": _SCALAR}, {"type": "object", "additionalProperties": _SCALAR}]}}
"""json_object: any JSON object whose values are scalars, arrays of scalars or objects of scalars (nesting
without a bound is not regular; two levels keep the automaton at a few hundred states)."""


def json_pattern(schema: dict | None) -> str:
    """The regular expression of the JSON texts `schema` allows (None: any object, ANY_OBJECT)."""
    import json

    from outlines_core.json_schema import build_regex_from_schema

    try:
        pattern = build_regex_from_schema(json.dumps(ANY_OBJECT if schema is None else schema), JSON_WHITESPACE)
    except Exception as e:  # outlines-core raises its own ValueError/TypeError subclasses for what it cannot serve
        raise ConstraintError(f"json_schema: this schema cannot be served: {str(e).strip() or type(e).__name__}") from None
    if len(pattern) > MAX_JSON_PATTERN_CHARS:
        raise ConstraintError(f"json_schema: the schema's pattern has {len(pattern)} characters, more than "
                              f"{MAX_JSON_PATTERN_CHARS}: give it fewer properties, alternatives or repetitions")
    return pattern


def compile_json(schema: dict | None, chars: list[str], timeout_s: float = COMPILE_TIMEOUT_S) -> Constraint:
    """The generated text is one JSON value that `schema` allows (None: any JSON object, `ANY_OBJECT`).
    Blocks for up to `timeout_s` (call it off the event loop)."""
    import json

    pattern = json_pattern(schema)
    name = "json_object" if schema is None else "json_schema: the schema"
    transitions, finals, alphabet = COMPILER.run(pattern, chars, timeout_s, outside=True, name=name)
    return _build("json", "json_object" if schema is None else json.dumps(schema)[:200], transitions, finals, alphabet,
                  len(chars), JSON_PREFER)
