"""`charlstm serve`: the HTTP service under uvicorn, draining on SIGTERM."""

from __future__ import annotations

import argparse

from ..model import store


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..settings import Settings

    for name, field in Settings.model_fields.items():
        if name == "model_store":
            continue  # the global --store
        kind = {int: int, float: float}.get(field.annotation, str)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{field.description or ''} (env CHARLSTM_{name.upper()}, default {field.default})")


def run(args) -> int:
    import asyncio
    import logging
    import signal

    import uvicorn

    from ..api.edge import edge_protocol
    from ..server import build_app
    from ..settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    if args.store:
        overrides["model_store"] = args.store
    settings = Settings(**overrides)
    loaded = store.load(settings.model or store.default_model(settings.model_store), settings.model_store)  # fail fast, with the store's one clear message
    log = logging.getLogger("uvicorn.error")
    if not settings.requires_key and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s with no API key: anyone who can reach the port can use every route; "
                    "set CHARLSTM_API_KEY (and see CHARLSTM_TRUSTED_HOSTS)", settings.host)

    class DrainingServer(uvicorn.Server):
        """Keeps listening for drain_delay_s after the first SIGTERM/SIGINT, so a load balancer or a Kubernetes
        probe sees /ready 503 (the app's signal hook has begun the engine drain: new work is refused, running
        streams go on) before the port closes; then uvicorn's own shutdown runs. A second signal ends the
        delay at once. A drained stop is a clean stop: the process exits 0 instead of re-raising the signal
        (which would end it by SIGTERM, or with a KeyboardInterrupt traceback after Ctrl-C)."""

        loop: asyncio.AbstractEventLoop | None = None
        draining = False

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if settings.drain_delay_s > 0 and not self.draining and not self.should_exit and self.loop is not None:
                self.draining = True

                def delay() -> None:  # on the loop, so the wait blocks nothing
                    log.info("draining: /ready answers 503 for %.1f s, then the port closes", settings.drain_delay_s)
                    self.loop.call_later(settings.drain_delay_s, close)

                def close() -> None:
                    if not self.should_exit:  # a second signal may have closed it already
                        self._exit(sig, frame)

                self.loop.call_soon_threadsafe(delay)  # from a signal handler, only this wakes the loop safely
                return
            self._exit(sig, frame)

        def _exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
                self._captured_signals.remove(sig)  # uvicorn would raise it again once shut down

    # The edge's bounds: idle keep-alive here; connections (503 beyond), header size, header, body and send
    # timeouts in edge_protocol.
    config = uvicorn.Config(build_app(settings, loaded), host=settings.host, port=settings.port, log_level=settings.log_level,
                            workers=1, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
                            http=edge_protocol(settings), timeout_keep_alive=settings.keep_alive_s,
                            forwarded_allow_ips=settings.forwarded_allow_ips)
    DrainingServer(config).run()
    return 0
