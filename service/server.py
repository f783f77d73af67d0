"""The composition root: the HTTP app with metrics attached. `uvicorn service.server:app` serves it.

Building the app is cheap (no settings read, no model loaded): that happens in the lifespan.
"""

from __future__ import annotations

from fastapi import FastAPI

from .api.app import create_app
from .metrics import instrument
from .settings import Settings
from .store import LoadedModel


def build_app(settings: Settings | None = None, loaded: LoadedModel | None = None, session_store_factory=None) -> FastAPI:
    app = create_app(settings, loaded, session_store_factory)
    instrument(app)
    return app


app = build_app()
