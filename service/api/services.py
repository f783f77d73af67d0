"""What the HTTP app serves with: the services the composition root (service/server.py) builds and runs.

The app only reads them; building them, starting them and shutting them down is the root's job."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.observers import Fanout
from ..engine.pool import ModelPool
from ..sessions.calls import SessionCalls
from ..sessions.health import StoreHealth
from ..sessions.snapshots import Snapshots
from ..sessions.store import SessionStore
from .quotas import Quotas


@dataclass
class Services:
    pool: ModelPool  # the servable models and an engine for each loaded one
    sessions: SessionCalls  # session calls, on `session_store`
    session_store: SessionStore
    persistence: Snapshots | None  # the in-memory store's SQLite snapshots
    store_health: StoreHealth  # the session store's state as the background sweep last saw it
    session_quotas: Quotas  # sessions a client may make per second
    events: Fanout  # session and refusal events, to the metrics
    session_key: bytes  # signs exported sessions


def services_of(app) -> Services | None:
    """The app's services, None before they have started."""
    return getattr(app.state, "services", None)
