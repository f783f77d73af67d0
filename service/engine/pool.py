"""The models a server serves: which can be asked for, which are loaded, and each one's engine.

A request names a model (`name`, its newest servable version; `name@version`; or nothing, the default)
and the pool hands out that model's engine, loading it on first use, as Ollama does. At most `max_loaded`
models are loaded at once: a model idle for `keep_alive_s` unloads, and a load at the cap first unloads
the least recently used idle model (none idle: the request is refused, 503 `too_many_models`). A model
in use, a request between resolving it and submitting or streams in its engine, never unloads.

Every engine has its own batch and thread; they take turns on the cores through one ComputeShare.
The pool runs on the event loop: loading (reading the weights, building and measuring a backend) and
stopping an engine happen in worker threads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..model import store
from ..model.store import LoadedModel, ModelLoadError
from ..model.vocab import CharVocab
from .engine import Engine
from .observers import Fanout
from .share import ComputeShare
from .types import EngineError, ShuttingDown

log = logging.getLogger("charlstm.models")

ALL = "all"


class ModelNotFound(EngineError, type="model_not_found"):
    """The request names no model this server serves (404)."""

    param = "model"


class TooManyModels(EngineError, type="too_many_models"):
    """Every loaded model is busy and max_loaded_models are loaded (429)."""


class ModelLoadFailed(EngineError, type="model_load_failed"):
    """The model's files could not be loaded."""


@dataclass(frozen=True, eq=False)
class Servable:
    """A model the server may load: its store entry, read from its card."""

    ref: str  # name@version
    name: str
    version: str
    path: Path
    card: dict

    @property
    def fingerprint(self) -> str:
        return self.card.get("weights_sha256", "")

    @functools.cached_property
    def vocab(self) -> CharVocab:
        """The model's characters, from its card: tokenizing needs no weights loaded."""
        return CharVocab(self.card["vocab"])


@dataclass
class Served:
    """A loaded model and its engine. `pins`: requests using it now (between resolving and submitting)."""

    model: Servable
    loaded: LoadedModel
    engine: Engine
    details: dict  # what the engine factory says of its backend, for /info
    load_seconds: float
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def ref(self) -> str:
        return self.model.ref

    def idle(self) -> bool:
        return self.pins == 0 and self.engine.idle()


class PoolObserver(Protocol):
    """What the pool reports; the metrics module implements it."""

    def on_model_loaded(self, served: Served) -> None: ...
    def on_model_unloaded(self, served: Served, reason: str) -> None: ...  # keep_alive, capacity, removed, shutdown


EngineFactory = Callable[[LoadedModel, ComputeShare], tuple[Engine, dict]]


def parse_models(spec: str) -> list[str] | None:
    """`models` as a list of references; None for `all`; [] for the default model alone."""
    spec = spec.strip()
    if spec == ALL:
        return None
    return [part.strip() for part in spec.split(",") if part.strip()]


DEFAULT_CHECK_S = 1.0  # how often the pool reads the store's default again


class Catalog:
    """The servable models: the store's models that `models` allows, re-read by `refresh`.

    `default` (a name, name@version or model folder; empty: the store's default, read again whenever
    `charlstm models --set-default` changes it) names the model of a request that names none."""

    def __init__(self, root: str | Path | None, spec: str = "", default: str = "", preloaded: LoadedModel | None = None):
        self.wanted, self.fixed_default = parse_models(spec), default
        self.root = self.root_path = store.store_root(root)  # the environment is read once, here: never on a request's path
        self.preloaded = preloaded
        self.models: dict[str, Servable] = {}
        self._stamp: tuple | None = None  # default.json's (mtime, size) when last read
        self._store_default = ""

    def refresh(self, strict: bool = True) -> tuple[list[str], list[str]]:
        """Scan the store again; returns the references (added, removed). `strict`: a listed model missing
        from the store is an error (at start); otherwise it is left out with a warning (a reload)."""
        before = set(self.models)
        found: dict[str, Servable] = {}
        if self.preloaded is not None:
            found[self.ref_of(self.preloaded.card)] = self._servable(self.preloaded.card, self.preloaded.path)
        if self.wanted is None:  # all: every version of every model in the store
            for name, version, card in store.list_models(self.root):
                if card is not None:
                    found.setdefault(f"{name}@{version}", self._servable(card, self.root_path / name / version))
        else:
            refs = self.wanted or [self.fixed_default or store.default_model(self.root)]
            if self.fixed_default and self.fixed_default not in refs:
                refs = [self.fixed_default, *refs]
            for ref in refs:
                try:
                    folder = store.resolve(ref, self.root)  # raises ModelLoadError naming what is missing
                    card = store.read_card(folder)
                except ModelLoadError as e:
                    if strict:
                        raise
                    log.warning("%s: left out of the models served", e)
                    continue
                found.setdefault(self.ref_of(card), self._servable(card, folder))
        self.models = dict(sorted(found.items(), key=lambda kv: (kv[1].name, _version_number(kv[1].version))))
        return sorted(set(found) - before), sorted(before - set(found))

    def default_ref(self) -> str:
        """The servable model a request without `model` gets. The store's default as last read: a request
        reads no file (`check_store_default` follows the store, the pool calls it every second)."""
        ref = self.fixed_default or self._store_default or self._read_store_default()
        try:
            return self.resolve(ref).ref
        except ModelNotFound:
            if not self.models:
                raise
            return next(iter(self.models))  # the store's default is not served here: the first model served

    def resolve(self, ref: str | None) -> Servable:
        """`name` (its newest servable version), `name@version`, a served model folder, or None (the default)."""
        if ref is None or ref == "":
            return self.resolve(self.default_ref())
        if ref in self.models:
            return self.models[ref]
        name, _, version = ref.partition("@")
        if not version:
            versions = [m for m in self.models.values() if m.name == name]
            if versions:
                return max(versions, key=lambda m: _version_number(m.version))
        if "/" in ref or ref.startswith("."):  # the folder the server was started with
            folder = Path(ref).expanduser().resolve()
            for model in self.models.values():
                if model.path == folder:
                    return model
        raise ModelNotFound(f"model {ref!r} is not served here; served: {', '.join(self.models) or 'none'} (see /v1/models)")

    def by_fingerprint(self, sha: str) -> Servable | None:
        return next((m for m in self.models.values() if m.fingerprint == sha), None)

    def check_store_default(self) -> None:
        """Read the store's default again if its file changed (blocking: call it off the event loop)."""
        if not self.fixed_default:
            self._read_store_default()

    def _read_store_default(self) -> str:
        path = self.root_path / store.DEFAULT_FILE
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp or not self._store_default:
            changed = self._stamp is not None
            self._stamp = stamp
            try:
                self._store_default = store.default_model(self.root)
            except ModelLoadError as e:
                log.warning("%s; requests without a model get the first model served", e)
                self._store_default = next(iter(self.models), "")
            if changed and self.wanted == []:  # serving the store's default alone: follow it
                self.refresh(strict=False)
        return self._store_default

    @staticmethod
    def ref_of(card: dict) -> str:
        return f"{card['name']}@{card['version']}"

    def _servable(self, card: dict, folder: Path) -> Servable:
        return Servable(ref=self.ref_of(card), name=card["name"], version=card["version"], path=Path(folder).resolve(), card=card)


def _version_number(version: str) -> int:
    return int(version[1:]) if version[1:].isdigit() else -1


class ModelPool:
    def __init__(self, catalog: Catalog, factory: EngineFactory, max_loaded: int, keep_alive_s: float,
                 observers: Iterable[PoolObserver] = ()):
        """`keep_alive_s`: how long a model stays loaded after its last use; below 0, until the cap needs it."""
        self.catalog, self.factory, self.max_loaded, self.keep_alive_s = catalog, factory, max_loaded, keep_alive_s
        self.observers = list(observers)
        self.events: PoolObserver = Fanout(PoolObserver, self.observers)  # type: ignore[assignment]: each observer's method
        self.share = ComputeShare()
        self.loaded: dict[str, Served] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._draining = False
        self.started = False  # the default model loaded once: the server can take requests
        self._sweeper: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    # ------------------------------------------------------------------ requests
    @asynccontextmanager
    async def use(self, ref: str | None):
        """The loaded model `ref` names, pinned (it cannot unload) until the block ends; work the block
        submitted keeps the engine busy after that, so a streamed response keeps its model too."""
        served = await self.acquire(ref)
        try:
            yield served
        finally:
            self.release(served)

    async def acquire(self, ref: str | None) -> Served:
        model = self.catalog.resolve(ref)
        while True:
            if self._draining:
                raise ShuttingDown("the server is shutting down and admits no new work")
            served = self.loaded.get(model.ref)
            if served is not None:
                served.pins += 1
                served.last_used = time.monotonic()
                return served
            task = self._loading.get(model.ref)
            if task is None:
                if len(self.loaded) + len(self._loading) >= self.max_loaded:
                    victim = self._least_recently_used_idle()
                    if victim is None:
                        raise TooManyModels(f"{self.max_loaded} models are loaded (max_loaded_models) and each is in use; "
                                            f"{model.ref} loads when one is idle: retry shortly")
                    await self._unload(victim, "capacity")
                    continue  # the world may have moved while the engine stopped
                task = self._loading[model.ref] = asyncio.create_task(self._load(model))
            try:
                await asyncio.shield(task)  # a request that goes away does not cancel the load for the others
            except Exception as e:  # a store entry that fails to load is the server's fault, not the request's
                raise ModelLoadFailed(f"model {model.ref} could not be loaded: {e}") from None

    def release(self, served: Served) -> None:
        served.pins -= 1
        served.last_used = time.monotonic()

    def served_for_fingerprint(self, sha: str) -> Servable | None:
        """The servable model whose weights a session's state belongs to."""
        return self.catalog.by_fingerprint(sha)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Scan the store and load the default model, so a server that starts can serve it (and a broken
        default fails the start, as it did with one model)."""
        if not self.catalog.models:
            await asyncio.to_thread(self.catalog.refresh)
        served = await self.acquire(None)
        self.release(served)
        self.started = True
        self._sweeper = asyncio.create_task(self._sweep_forever())
        self._watcher = asyncio.create_task(self._watch_store_default())

    async def reload(self) -> dict:
        """Read the store again: new models become servable; a model gone from it unloads once idle."""
        added, removed = await asyncio.to_thread(self.catalog.refresh, False)
        await asyncio.to_thread(self.catalog.check_store_default)
        for ref in removed:
            served = self.loaded.get(ref)
            if served is not None and served.idle():
                await self._unload(served, "removed")
        log.info("models reloaded: %d servable, added %s, removed %s", len(self.catalog.models), added or "none",
                 removed or "none")
        return {"added": added, "removed": removed, "models": list(self.catalog.models)}

    def begin_shutdown(self, grace_s: float) -> None:
        self._draining = True
        for served in self.loaded.values():
            served.engine.begin_shutdown(grace_s)

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        return all(s.engine.wait_idle(max(0.0, end - time.monotonic())) for s in list(self.loaded.values()))

    async def close(self) -> None:
        for task in (self._sweeper, self._watcher):
            if task is not None:
                task.cancel()
        for task in self._loading.values():
            task.cancel()
        for served in list(self.loaded.values()):
            await self._unload(served, "shutdown")

    def ready(self) -> tuple[bool, str]:
        """(ready, why not): every loaded engine steps; the pool admits work."""
        if self._draining:
            return False, "shutting down"
        for served in self.loaded.values():
            snap = served.engine.snapshot()
            if snap.failed:
                return False, "failed"
            if not snap.ready:
                return False, "not ready"
        return True, ""

    def counts(self) -> tuple[int, int]:
        """(running, waiting) streams over every loaded model."""
        snaps = [s.engine.snapshot() for s in self.loaded.values()]
        return sum(s.running for s in snaps), sum(s.waiting for s in snaps)

    # ------------------------------------------------------------------ inside
    async def _load(self, model: Servable) -> Served:
        t0 = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(self._read, model)
            engine, details = await asyncio.to_thread(self.factory, loaded, self.share)
            engine.start()
            served = Served(model=model, loaded=loaded, engine=engine, details=details,
                            load_seconds=time.perf_counter() - t0)
            self.loaded[model.ref] = served
            log.info("loaded %s in %.2f s (%s)", model.ref, served.load_seconds, details["backend"]["name"])
            self.events.on_model_loaded(served)
            return served
        finally:
            self._loading.pop(model.ref, None)

    def _read(self, model: Servable) -> LoadedModel:
        preloaded = self.catalog.preloaded
        if preloaded is not None and Catalog.ref_of(preloaded.card) == model.ref and preloaded.tensors is not None:
            return preloaded  # (once a backend was built from it, its weights are let go: read again)
        return store.load(str(model.path))

    async def _unload(self, served: Served, reason: str) -> None:
        if self.loaded.get(served.ref) is not served:
            return
        del self.loaded[served.ref]  # a request from now on loads the model afresh
        served.engine.begin_shutdown(0.0)
        await asyncio.to_thread(served.engine.stop)
        log.info("unloaded %s (%s)", served.ref, reason)
        self.events.on_model_unloaded(served, reason)

    def _least_recently_used_idle(self) -> Served | None:
        idle = [s for s in self.loaded.values() if s.idle()]
        return min(idle, key=lambda s: s.last_used) if idle else None

    async def sweep(self) -> None:
        """Unload what has idled past its keep-alive, and models no longer in the store; a busy model's
        clock restarts (keep-alive counts from the end of its last stream)."""
        now = time.monotonic()
        for served in list(self.loaded.values()):
            if not served.idle():
                served.last_used = now
            elif served.ref not in self.catalog.models:
                await self._unload(served, "removed")
            elif self.keep_alive_s >= 0 and now - served.last_used >= self.keep_alive_s:
                await self._unload(served, "keep_alive")

    async def _sweep_forever(self) -> None:
        interval = min(5.0, max(0.1, self.keep_alive_s / 10)) if self.keep_alive_s >= 0 else 5.0
        while True:
            await asyncio.sleep(interval)  # a periodic check in the server, not a wait for a condition
            try:
                await self.sweep()
            except Exception:
                log.exception("unloading idle models failed")

    async def _watch_store_default(self) -> None:
        """The store's default followed once a second (`charlstm models --set-default` needs no restart),
        in a worker thread, so no request ever reads the store's files."""
        while True:
            await asyncio.sleep(DEFAULT_CHECK_S)  # a periodic check in the server, not a wait for a condition
            try:
                await asyncio.to_thread(self.catalog.check_store_default)
            except Exception:
                log.exception("reading the store's default failed")

