"""What goes into the engine and what comes out of it. Plain data; validated before it gets here.

The engine knows nothing of sessions or HTTP: a request carries the state to start from and the
position in its random stream, and a completed stream hands back the state it ended in. Whoever
holds a session (see `sessions.py`) turns that into a committed session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..sampling import SamplingParams
from .constraints import Constraint


@dataclass(frozen=True)
class Client:
    """Who sent a request, as far as fairness goes (`fairness.py`). `id` keys its share: a named API key,
    or the client's address. `label` names it in metrics: a key's name, while every address shares
    "anonymous", so the series stay few. `weight`: its share against the others' (2: twice another's).
    `max_requests`: the most requests it may have running or waiting at once (None: its share only)."""

    id: str = "anonymous"
    label: str = "anonymous"
    weight: float = 1.0
    max_requests: int | None = None


ANONYMOUS = Client()


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # None: a fresh random seed
    counter: int = 0  # draws already made from this seed's random stream (a session continues its own)
    state: np.ndarray | None = None  # (2, L, H) float32 to continue from; None: the zero state of a new stream
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # the sampled characters' log-probabilities (params.top_logprobs adds alternatives)
    return_state: bool = False  # hand the final state back in Done (a session call keeps it)
    prompt_logprobs: int | None = None  # None: off; k: each prompt character's log-probability and k alternatives
    stream_tokens: bool = True  # Token events as characters are made; False: only the Done (a plain, non-streamed call)
    constraint: Constraint | None = field(default=None, repr=False)  # what the generated text must match (constraints.py)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (character id, bias added to its logit); -inf: never

    @property
    def fresh(self) -> bool:
        """A stream with no history: an empty prompt then feeds the start character."""
        return self.state is None


# The most likely characters at one position with their log-probabilities, most likely first.
Alternatives = tuple[tuple[str, float], ...]


class Token(NamedTuple):
    """New characters of a stream. A named tuple, not a frozen dataclass as the other events: one is made
    for every row of every look, and a frozen dataclass takes twice as long to build (0.53 against 0.23 us)."""

    index: int  # position of the first character in the generated text
    text: str
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[Alternatives, ...] | None = None  # one per character, when params.top_logprobs > 0


@dataclass(frozen=True)
class PromptScored:
    """The prompt's log-probabilities, sent once its last slice is ingested (before any Token), for a
    request with `prompt_logprobs`. Position i is log p(prompt[i] | everything before it); the first
    position of a fresh stream has no context and is None."""

    logprobs: tuple[float | None, ...]
    top_logprobs: tuple[Alternatives | None, ...] | None = None  # when prompt_logprobs > 0


@dataclass(frozen=True)
class Done:
    text: str
    finish_reason: str  # length | stop | cancelled | shutdown | error
    prompt_tokens: int  # characters fed, the start character of an empty fresh prompt included
    completion_tokens: int
    seed: int
    counter: int = 0  # the random stream's position after the last draw
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[Alternatives, ...] | None = None
    prompt: PromptScored | None = None  # for a request with prompt_logprobs
    state: np.ndarray | None = field(default=None, repr=False)  # (2, L, H), only for a completed return_state stream
    session: dict | None = None  # filled in by the session layer: the session's metadata after the call
    error: str | None = None  # what went wrong, for finish_reason "error"

    @property
    def completed(self) -> bool:
        """The stream ran to its own end (length or a stop string), so its state is a valid continuation."""
        return self.finish_reason in ("length", "stop")


class EngineError(Exception):
    """Base of every refusal, the engine's and the layers' above it (sessions, the model pool): each
    carries a stable `type` the HTTP layer maps to a status. A refusal is declared in one line,
    `class Name(EngineError, type="name")`, beside the layer that raises it."""

    type = "engine_error"

    def __init_subclass__(cls, type: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if type is not None:
            cls.type = type


class Overloaded(EngineError, type="overloaded"):
    """No room: the queue is full (429)."""


class Unsupported(EngineError, type="unsupported"):
    """A request asks for what this engine's step cannot do (a constraint on the CUDA graphs path)."""


class ShuttingDown(EngineError, type="shutting_down"):
    """The engine drains: new work is refused (503)."""


class EngineUnavailable(EngineError, type="engine_error"):
    """The engine thread has died: nothing can be served until the process restarts."""
