"""What a session operation can refuse with: each an EngineError with a stable `type`, so the HTTP layer
maps it to a status like any refusal of the engine's."""

from __future__ import annotations

from ..engine.types import EngineError


class SessionNotFound(EngineError, type="session_not_found"):
    """No such session: never made, expired or evicted (404)."""


class SessionBusy(EngineError, type="session_busy"):
    """Another call holds the session (409)."""


class TooManySessions(EngineError, type="too_many_sessions"):
    """The store holds max_sessions already (429)."""


class LeaseLost(EngineError, type="session_busy"):
    """A commit by someone who no longer holds the session's lease (it expired, or another took it)."""


class SessionStoreUnavailable(EngineError, type="session_store_unavailable"):
    """The session store cannot be reached (for example Redis is down)."""
