"""A real uvicorn server on a loopback port, in a thread of the test process, so a test can reach into
the engine (inject a fault, read its counters) while clients talk to it over real HTTP."""

from __future__ import annotations

import threading

import uvicorn

from service.server import build_app
from service.settings import Settings
from service.model.store import LoadedModel

from .server import free_port, wait_until


def own_copy(loaded: LoadedModel) -> LoadedModel:
    """The server's own LoadedModel of the same arrays: building its backend lets the model's weights go
    (`drop_module`), and the caller's (often the session's `tiny_model`) must keep them."""
    return LoadedModel(tensors=dict(loaded.tensors), vocab=loaded.vocab, card=loaded.card, path=loaded.path,
                       config=loaded.config)


class InProcessServer:
    def __init__(self, loaded: LoadedModel, hooks=(), session_store_factory=None, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings.setdefault("session_db", "")
        settings.setdefault("backend", "torch")  # as tests/server.py
        self.settings = Settings(host="127.0.0.1", port=self.port, torch_threads=1, **settings)
        self.app = build_app(self.settings, own_copy(loaded), session_store_factory, engine_hooks=hooks)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=60, what="the server to start")
        if not self.server.started:
            raise RuntimeError("the in-process server did not start")

    @property
    def engine(self):
        """The default model's engine."""
        pool = self.app.state.services.pool
        return pool.loaded[pool.catalog.resolve(None).ref].engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
