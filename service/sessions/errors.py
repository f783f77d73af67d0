"""What a session operation can refuse with. Each is an EngineError with a stable `type`, so the HTTP
layer maps it to a status like any refusal of the engine's."""

from __future__ import annotations

from ..engine.types import EngineError


class SessionNotFound(EngineError):
    type = "session_not_found"


class SessionBusy(EngineError):
    type = "session_busy"


class TooManySessions(EngineError):
    type = "too_many_sessions"


class LeaseLost(EngineError):
    """A commit by someone who no longer holds the session's lease (it expired, or another took it)."""

    type = "session_busy"


class SessionStoreUnavailable(EngineError):
    """The session store cannot be reached (for example Redis is down)."""

    type = "session_store_unavailable"
