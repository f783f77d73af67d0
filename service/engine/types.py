"""What goes into the engine and what comes out of it. Plain data; validated before it gets here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # None: a fresh random seed (or, in a session, the session's generator)
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    session_id: str | None = None


@dataclass(frozen=True)
class Token:
    index: int  # position of the first character in the generated text
    text: str
    logprobs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Done:
    text: str
    finish_reason: str  # length | stop | cancelled | shutdown
    prompt_tokens: int
    completion_tokens: int
    seed: int
    logprobs: tuple[float, ...] | None = None
    session: dict | None = None  # the session's metadata after the call


class EngineError(Exception):
    """Base of the engine's refusals; each carries a stable type the HTTP layer maps to a status."""

    type = "engine_error"


class Overloaded(EngineError):
    type = "overloaded"


class ShuttingDown(EngineError):
    type = "shutting_down"


class SessionNotFound(EngineError):
    type = "session_not_found"


class SessionBusy(EngineError):
    type = "session_busy"


class TooManySessions(EngineError):
    type = "too_many_sessions"
