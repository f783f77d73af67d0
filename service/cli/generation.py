"""One request through the serving engine for `charlstm sample`, so the command line has no sampling loop of
its own and a seed means the same text here as from a server on the same backend (torch fp32 unless told).

session_file.py runs the same request with a session's state; this module is the plain path and the one
place both build the engine and read its events.
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator

from ..backends import build
from ..backends.selector import reference_backend
from ..engine.constraints import Constraint, compile_choices, compile_regex
from ..engine.engine import Engine
from ..engine.types import Done, GenerationRequest, Token
from ..sampling import CONTROLS, SamplingParams
from ..model.store import LoadedModel

# The fp32 reference the server's tests and a pinned server use (torch's; ONNX Runtime's fp32 graph on the
# serving install, which has no torch); --backend picks another
DEFAULT_BACKEND = reference_backend()


def generate(engine: Engine, request: GenerationRequest) -> Iterator[Token | Done]:
    """One request through a running engine: its tokens as they come, then its Done."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(request, lambda batch: [events.put(e) for e in batch])
    while True:
        event = events.get()
        yield event
        if isinstance(event, Done):
            return


def run(loaded: LoadedModel, request: GenerationRequest, backend: str = DEFAULT_BACKEND) -> Iterator[Token | Done]:
    """Start an engine on `backend` for this one request, yield its events, stop the engine."""
    engine = Engine(build(backend, loaded), loaded.vocab)
    engine.start()
    try:
        yield from generate(engine, request)
    finally:
        engine.stop()


def sampling_params(args) -> SamplingParams:
    """The controls the command line gives; any it lacks stay at the server's defaults."""
    d = SamplingParams()
    return SamplingParams(**{name: getattr(args, name, getattr(d, name)) for name in CONTROLS})


def constraint(args, loaded: LoadedModel) -> Constraint | None:
    """--regex or --choice, compiled over the model's characters as the server compiles structured_outputs."""
    regex, choices = getattr(args, "regex", None), getattr(args, "choice", None) or []
    if regex is not None and choices:
        raise ValueError("give --regex or --choice, not both")
    if regex is not None:
        return compile_regex(regex, loaded.vocab.chars)
    return compile_choices(choices, loaded.vocab.chars) if choices else None


def print_text(events: Iterator[Token | Done]) -> Done:
    """Write the generated text to stdout as it comes, then a newline; the Done says how it ended."""
    done = None
    for event in events:
        if isinstance(event, Token):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        else:
            done = event
    sys.stdout.write("\n")
    return done


def sample(loaded: LoadedModel, args, prompt_ids: list[int]) -> Done:
    """`charlstm sample` without a session: a fresh stream from the prompt."""
    request = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=args.length, params=sampling_params(args),
                                seed=args.seed, stop=tuple(args.stop), constraint=constraint(args, loaded))
    done = print_text(run(loaded, request, args.backend or DEFAULT_BACKEND))
    if done.error:
        raise RuntimeError(f"generation failed ({done.finish_reason}): {done.error}")
    return done
