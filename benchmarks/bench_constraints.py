"""The constraint automaton's libraries side by side: interegular (what the server uses), outlines-core and
llguidance, on the bundled model's characters.

    python -m benchmarks.bench_constraints [--model shakespeare] [--steps 400] [--repeats 3]

outlines-core and llguidance are not among the project's dependencies; install them to compare
(`pip install outlines_core llguidance`), else only interegular is measured. For each pattern:
- compile: pattern -> something that masks (median of `repeats`). interegular's figure is the
  server's own path (`compile_regex`: the spawned compile process, the pruning, the mask table), and
  its in-process determinising alone; outlines-core builds its index over the vocabulary; llguidance
  builds a matcher, which computes masks lazily.
- step: one mask and one advance, microseconds, over a walk of `steps` characters that each library
  takes itself (the same random choice among what it allows).
- agree: whether every mask on the walk allowed exactly the characters the server's automaton allows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np

from service.model import store
from service.engine.constraints import ConstraintError, compile_regex, regex_transitions

from .common import table

PATTERNS = {
    "verse line": r"[A-Z][a-z]+(, [a-z]+)*[.!?]",
    "speaker": r"(KING|QUEEN|FIRST CITIZEN|ROMEO|JULIET)",
    "time": r"(1[0-2]|[1-9]):[0-5][0-9] (am|pm)",
    "bounded words": r"[a-z]{1,12}( [a-z]{1,12}){0,6}\.",
    "blow-up": r"(a|b)*a(a|b){12}",  # its deterministic automaton has 2**13 states: the server refuses it
}


class Server:
    """The server's automaton: a row of the mask table and a lookup per step."""

    name = "interegular (server)"

    def __init__(self, pattern: str, chars: list[str]):
        self.c = compile_regex(pattern, chars)

    def start(self):
        return 0

    def allowed(self, state) -> set[int]:
        return set(np.flatnonzero(self.c.next[state] >= 0).tolist())

    def advance(self, state, char: int):
        return int(self.c.next[state, char])


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, pattern: str, chars: list[str]):
        from outlines_core import Index, Vocabulary

        self.eos = len(chars)
        self.index = Index(pattern, Vocabulary(self.eos, {c: [i] for i, c in enumerate(chars)}))

    def start(self):
        return self.index.get_initial_state()

    def allowed(self, state) -> set[int]:
        return set(self.index.get_allowed_tokens(state)) - {self.eos}

    def advance(self, state, char: int):
        return self.index.get_next_state(state, char)


class CharTokenizer:
    """What llguidance's TokenizerWrapper reads: one token a character, and an end token after them."""

    def __init__(self, chars: list[str]):
        self.ids = {c: i for i, c in enumerate(chars)}
        self.tokens = [c.encode() for c in chars] + [b"<eos>"]
        self.eos_token_id, self.bos_token_id, self.special_token_ids = len(chars), None, [len(chars)]

    def __call__(self, text: str) -> list[int]:
        return [self.ids[c] for c in text]


class LLGuidance:
    name = "llguidance"

    def __init__(self, pattern: str, chars: list[str]):
        import llguidance

        self.V = len(chars)
        tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(CharTokenizer(chars)))
        self.m = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_regex(pattern), log_level=0)
        if self.m.is_error():
            raise ValueError(self.m.get_error())

    def start(self):
        self.m.reset()  # the matcher holds its state
        return None

    def allowed(self, state) -> set[int]:
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return set(np.flatnonzero(bits[: self.V]).tolist())

    def advance(self, state, char: int):
        return None if not self.m.consume_token(char) else True


def walk(lib, steps: int, seed: int, reference: Server) -> tuple[float, bool]:
    """Microseconds a mask + advance, and whether each mask equals the server's; restarts at a dead end."""
    rng = random.Random(seed)
    spent, agree, state, ref = 0.0, True, lib.start(), 0
    for _ in range(steps):
        t = time.perf_counter()
        allowed = lib.allowed(state)
        spent += time.perf_counter() - t
        agree &= allowed == reference.allowed(ref)
        if not allowed:  # a full match that cannot go on: start another text
            state, ref = lib.start(), 0
            continue
        char = rng.choice(sorted(allowed))
        t = time.perf_counter()
        state = lib.advance(state, char)
        spent += time.perf_counter() - t
        ref = reference.advance(ref, char)
    return spent / steps * 1e6, agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    loaded = store.load(args.model or store.default_model())
    chars = list(loaded.vocab.chars)
    libs = [Server]
    for cls, module in ((OutlinesCore, "outlines_core"), (LLGuidance, "llguidance")):
        try:
            __import__(module)
            libs.append(cls)
        except ImportError:
            print(f"{module} is not installed: not compared")
    rows = []
    for label, pattern in PATTERNS.items():
        start = time.perf_counter()
        try:
            reference = Server(pattern, chars)
        except ConstraintError as e:
            rows.append([label, "interegular (server)", f"{(time.perf_counter() - start) * 1e3:.1f}", "", f"refused: {e}", ""])
            for cls in libs[1:]:
                start = time.perf_counter()
                try:
                    cls(pattern, chars)
                    outcome = "built"
                except Exception as e:  # each library's own error
                    outcome = f"{type(e).__name__}"
                rows.append([label, cls.name, f"{(time.perf_counter() - start) * 1e3:.1f}", "", outcome, ""])
            continue
        t = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            regex_transitions(pattern, chars)
            t.append(time.perf_counter() - start)
        rows.append([label, "interegular (determinise only)", f"{statistics.median(t) * 1e3:.1f}", "", "", ""])
        for cls in libs:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                lib = cls(pattern, chars)
                times.append(time.perf_counter() - start)
            us, agree = walk(lib, args.steps, seed=1, reference=reference)
            rows.append([label, cls.name, f"{statistics.median(times) * 1e3:.1f}", f"{us:.1f}",
                         "yes" if agree else "NO", str(reference.c.states)])
    print(f"{loaded.name}@{loaded.version}: {len(chars)} characters, {args.steps} steps a walk, medians of {args.repeats}")
    print(table(["pattern", "library", "compile ms", "step us", "masks agree", "server states"], rows))


if __name__ == "__main__":
    main()
