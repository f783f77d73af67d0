"""JSON schema to a character mask, three ways side by side: the server's path (outlines-core writes the
schema as a regular expression, interegular determinises it, the jump-forward table), llguidance and
xgrammar, on the bundled model's characters.

    python -m benchmarks.bench_json_schema [--model shakespeare] [--steps 400] [--repeats 3] [--texts 200]

llguidance and xgrammar are not among the project's dependencies; install them to compare
(`pip install llguidance xgrammar transformers`; xgrammar imports transformers), else only the server's
path is measured. The model's vocabulary has no brace, quote or most digits, so the two libraries are
given a vocabulary of the model's characters plus the JSON characters it lacks (the server writes
those for the model). For each schema:
- compile: schema -> something that masks, median of `repeats` (the server's figure is its whole path:
  the spawned compile process, the pruning and the table; the libraries' in process).
- step: one mask and one advance, microseconds, on a walk of `steps` characters that each takes itself.
- agree: of `texts` texts that random rows through the server's automaton write, how many each library
  accepts as a whole, and how many `json.loads` and the schema (jsonschema) accept.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

from service.model import store
from service.engine.constraints import ANY_OBJECT, COMPILER, compile_json, json_pattern, regex_transitions

from tests.constraint_walk import random_text

from .bench_constraints import CharTokenizer
from .common import table

SCHEMAS = {
    "person (string, bounded array)": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "lines": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
        "required": ["name", "lines"]},
    "speech (enum, string, integer)": {"type": "object", "properties": {
        "speaker": {"enum": ["KING", "QUEEN", "FOOL"]}, "line": {"type": "string", "maxLength": 40},
        "count": {"type": "integer"}}, "required": ["speaker", "line", "count"], "additionalProperties": False},
    "scene (nested objects, 8 fields)": {"type": "object", "properties": {
        "act": {"type": "integer"}, "scene": {"type": "integer"}, "place": {"type": "string"},
        "speakers": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "lines": {"type": "integer"}}, "required": ["name", "lines"]}},
        "exit": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
        "required": ["act", "scene", "place", "speakers", "exit"]},
    "json_object": None,
}


def extended(chars: list[str]) -> list[str]:
    """The model's characters and the JSON characters it lacks (what the libraries are given)."""
    return chars + [c for c in '{}[]"\\/0123456789+' if c not in chars]


def server_walks(constraint, chars: list[str], n: int, seed: int) -> list[str]:
    """n texts that random rows through the server's automaton write."""
    rng, texts = np.random.default_rng(seed), []
    while len(texts) < n:
        text = random_text(constraint, chars, rng, limit=600)
        if text is not None:
            texts.append(text)
    return texts


class Library:
    """One way to mask: the characters that may come next, taking one, starting again."""

    name = "?"

    def allowed(self) -> np.ndarray:
        raise NotImplementedError

    def consume(self, char: int) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def walk_us(self, steps: int, seed: int) -> float:
        """Microseconds a mask and an advance, on a walk of random choices among what it allows."""
        rng, spent = random.Random(seed), 0.0
        for _ in range(steps):
            t = time.perf_counter()
            allowed = self.allowed()
            spent += time.perf_counter() - t
            if not len(allowed):
                self.restart()
                continue
            char = rng.choice(allowed.tolist())
            t = time.perf_counter()
            self.consume(char)
            spent += time.perf_counter() - t
        return spent / steps * 1e6


class Server(Library):
    name = "server: outlines-core regex + interegular + jump-forward"

    def __init__(self, schema, chars: list[str]):
        self.c, self.chars, self.state = compile_json(schema, chars, timeout_s=60), chars, 0

    def allowed(self) -> np.ndarray:
        return np.flatnonzero(~self.c.forbid[self.state])

    def consume(self, char: int) -> None:
        nxt = int(self.c.next[self.state, char])
        self.c.pieces.get((self.state, char))
        self.state = 0 if nxt < 0 or self.c.terminal[nxt] else nxt  # an ended row starts again


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, schema, chars: list[str]):
        import llguidance

        self.llg, self.chars, self.ids = llguidance, chars, {c: i for i, c in enumerate(chars)}
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(CharTokenizer(chars)))
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema or {"type": "object"}))
        self.m = self.matcher()

    def matcher(self):
        m = self.llg.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def allowed(self) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return np.flatnonzero(bits[: len(self.chars)])

    def consume(self, char: int) -> None:
        self.m.consume_token(char)

    def restart(self) -> None:
        self.m = self.matcher()

    def accepts(self, text: str) -> bool:
        m = self.matcher()
        return all(m.consume_token(self.ids[c]) for c in text) and m.is_accepting()


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, schema, chars: list[str]):
        import xgrammar

        self.xg, self.chars, self.ids = xgrammar, chars, {c: i for i, c in enumerate(chars)}
        info = xgrammar.TokenizerInfo(chars + ["<eos>"], vocab_type=xgrammar.VocabType.RAW, stop_token_ids=[len(chars)])
        self.compiled = xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
            json.dumps(schema or {"type": "object"}))
        self.m = xgrammar.GrammarMatcher(self.compiled)
        self.bitmask = xgrammar.allocate_token_bitmask(1, len(chars) + 1)

    def allowed(self) -> np.ndarray:
        if self.m.is_terminated():
            return np.zeros(0, dtype=np.int64)
        self.m.fill_next_token_bitmask(self.bitmask)
        bits = np.unpackbits(self.bitmask[0].numpy().view(np.uint8), bitorder="little")
        return np.flatnonzero(bits[: len(self.chars)])

    def consume(self, char: int) -> None:
        self.m.accept_token(char)

    def restart(self) -> None:
        self.m = self.xg.GrammarMatcher(self.compiled)

    def accepts(self, text: str) -> bool:
        m = self.xg.GrammarMatcher(self.compiled)
        return all(m.accept_token(self.ids[c]) for c in text) and m.accept_token(len(self.chars))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--texts", type=int, default=200)
    args = ap.parse_args()
    import jsonschema

    loaded = store.load(args.model or store.default_model())
    chars = list(loaded.vocab.chars)
    wide = extended(chars)
    libs = []
    for cls, module in ((LLGuidance, "llguidance"), (XGrammar, "xgrammar")):
        try:
            __import__(module)
            libs.append(cls)
        except ImportError as e:
            print(f"{module} cannot be imported ({e}): not compared")
    rows = []
    for label, schema in SCHEMAS.items():
        times, server = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            server = Server(schema, chars)
            times.append(time.perf_counter() - start)
        pattern = json_pattern(schema)
        start = time.perf_counter()
        regex_transitions(pattern, chars, outside=True)
        determinise = time.perf_counter() - start
        texts = server_walks(server.c, chars, args.texts, seed=3)
        valid = 0
        for text in texts:
            try:
                jsonschema.validate(json.loads(text), ANY_OBJECT if schema is None else schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        rows.append([label, Server.name, f"{statistics.median(times) * 1e3:.1f} (determinise {determinise * 1e3:.0f})",
                     f"{server.walk_us(args.steps, 1):.1f}", f"{valid}/{len(texts)} valid JSON of the schema",
                     str(server.c.states)])
        for cls in libs:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                lib = cls(schema, wide)
                times.append(time.perf_counter() - start)
            accepted = sum(lib.accepts(t) for t in texts)
            rows.append([label, cls.name, f"{statistics.median(times) * 1e3:.1f}", f"{lib.walk_us(args.steps, 1):.1f}",
                         f"{accepted}/{len(texts)} of the server's texts accepted", ""])
    COMPILER.close()
    print(f"{loaded.name}@{loaded.version}: {len(chars)} characters ({len(wide)} with the JSON characters it lacks), "
          f"{args.steps} steps a walk, medians of {args.repeats}")
    print(table(["schema", "library", "compile ms", "step us", "agree", "server states"], rows))


if __name__ == "__main__":
    main()
