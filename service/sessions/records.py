"""Sessions as values: an immutable record and the lease that lets one holder commit it.

A session is a fixed-size LSTM state plus the position of its random stream. The engine never
holds a session: a call leases a copy, generates from it, and commits the result with the version it
read, so a holder whose lease expired (a replica that died, a call that outlived its lease) can never
overwrite a newer commit.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

import numpy as np


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


@dataclass(frozen=True)
class SessionRecord:
    id: str
    state: np.ndarray  # (2, L, H) float32: h and c of every layer; never changed in place
    seed: int
    counter: int  # random draws made so far: the position in the seed's stream
    position: int  # characters consumed so far
    model: str  # sha256 of the weights the state belongs to
    ttl_s: float  # idle time before expiry
    created_at: float  # wall clock, seconds
    last_used: float  # wall clock, seconds
    version: int = 0  # bumped by every commit

    @property
    def expires_at(self) -> float:
        return self.last_used + self.ttl_s

    def metadata(self, busy: bool = False) -> dict:
        return {"session_id": self.id, "position": self.position, "seed": self.seed, "created_at": self.created_at,
                "last_used": self.last_used, "expires_at": self.expires_at, "ttl_seconds": self.ttl_s, "busy": busy}

    def advanced(self, state: np.ndarray, seed: int, counter: int, consumed: int) -> SessionRecord:
        """The record after a completed call that consumed `consumed` characters."""
        return replace(self, state=state, seed=seed, counter=counter, position=self.position + consumed)


@dataclass(frozen=True)
class Lease:
    """The right to commit one session, until `expires_at` (the store's clock) unless renewed."""

    session_id: str
    token: str
    record: SessionRecord  # the copy the holder works on
    expires_at: float
