"""Prometheus metrics: the only module that talks to prometheus-client.

Each model's engine reports numbers through its observer interface, with the model as a label; the
model pool reports loads and unloads; HTTP requests are counted by an ASGI middleware here; gauges read
the engines' snapshots at scrape time. Each app gets its own registry, with
the process_* and python_* series an operator's dashboards expect beside the charlstm_* ones.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI, Request, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info, PlatformCollector,
                               ProcessCollector, disable_created_metrics, generate_latest)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .backends.selector import installed_version
from .engine.pool import ModelPool, Served
from .sessions.store import SessionStore
from .settings import Settings

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# Every label value a labelled counter can take, each exported at 0 from the start so rate() works from the
# first scrape (a series that appears only at its first event hides that event from rate()).
FINISH_REASONS = ("length", "stop", "cancelled", "shutdown", "error")
REJECTION_REASONS = ("overloaded", "shutting_down", "session_busy", "too_many_sessions", "engine_error", "rate_limited")
SESSION_REMOVAL_REASONS = ("expired", "evicted", "deleted")
SESSION_STORE_OPERATIONS = ("create", "get", "is_leased", "lease", "renew", "commit", "release", "delete")


FEW_VALUES = 8  # CountedHistogram: up to this many values at once, a Python loop costs less than numpy's calls


class CountedHistogram:
    """A histogram fed many values at once, each standing for a count of observations, one series a model.

    A look of k steps hands over each row's k characters together: one (mean gap, k) pair a row, where
    prometheus-client's Histogram takes one value a call (256 rows x 16 characters: 2.6 ms of calls a
    look, more than the GPU's 2.3 ms). The buckets are summed with numpy and exported through the
    client's own metric family, so the series are those of any histogram."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)  # upper bounds (le), +Inf implied
        self._bound_list = self.bounds.tolist()
        self._series: dict[str, list] = {}  # model -> [counts per bucket (the last past every bound), sum]
        self._lock = threading.Lock()  # observed on the engine threads, collected on a scrape
        registry.register(self)

    def labels(self, model: str) -> None:
        """Export the model's series (at 0) from now on."""
        with self._lock:
            self._series_of(model)

    def _series_of(self, model: str) -> list:
        """The model's [counts per bucket, sum], made at 0 on first use (under the lock)."""
        return self._series.setdefault(model, [np.zeros(len(self.bounds) + 1, dtype=np.int64), 0.0])

    def observe_counted(self, model: str, values: list[float], counts: list[int]) -> None:
        if len(values) <= FEW_VALUES:  # a few rows: Python's bisect, without numpy's fixed cost per call
            with self._lock:
                series = self._series_of(model)
                for value, count in zip(values, counts):
                    series[0][bisect.bisect_left(self._bound_list, value)] += count  # the first bound >= value
                    series[1] += value * count
            return
        v = np.fromiter(values, dtype=np.float64)
        c = np.fromiter(counts, dtype=np.int64, count=len(v))
        slot = np.searchsorted(self.bounds, v, side="left")  # the first bound >= value: Prometheus' "le"
        with self._lock:
            series = self._series_of(model)
            np.add.at(series[0], slot, c)
            series[1] += float(v @ c)

    def collect(self):
        with self._lock:
            series = {model: (np.cumsum(counts), total) for model, (counts, total) in self._series.items()}
        bounds = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        for model, (cumulative, total) in sorted(series.items()):
            family.add_metric([model], buckets=list(zip(bounds, cumulative.tolist())), sum_value=total)
        yield family


class PoolCollector:
    """Gauges read from the model pool at scrape time: streams running and waiting for each loaded model,
    and which servable models are loaded."""

    def __init__(self, registry: CollectorRegistry):
        self.pool = None
        registry.register(self)

    def collect(self):
        running = GaugeMetricFamily("charlstm_running_streams", "Streams in the batch or ingesting their prompt", labels=["model"])
        waiting = GaugeMetricFamily("charlstm_waiting_streams", "Streams queued for a row", labels=["model"])
        loaded = GaugeMetricFamily("charlstm_model_loaded", "1 for a servable model loaded now, 0 for one that loads on first use",
                                   labels=["model"])
        pool = self.pool
        if pool is not None:
            for ref, served in list(pool.loaded.items()):
                snap = served.engine.snapshot()
                running.add_metric([ref], snap.running)
                waiting.add_metric([ref], snap.waiting)
            for ref in list(pool.catalog.models):
                loaded.add_metric([ref], 1.0 if ref in pool.loaded else 0.0)
        yield running
        yield waiting
        yield loaded


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        self.requests = Counter("charlstm_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r)
        self.request_duration = Histogram("charlstm_request_duration_seconds", "HTTP request duration, streams until their end",
                                          ["route"], buckets=LATENCY, registry=r)
        self.ttft = Histogram("charlstm_time_to_first_token_seconds", "Submission to first generated character", ["model"],
                              buckets=LATENCY, registry=r)
        self.itl = CountedHistogram("charlstm_inter_token_latency_seconds", "Time between two characters of one stream "
                                    "(the characters of one look count its mean gap each)", buckets=FAST, registry=r)
        self.queue_time = Histogram("charlstm_queue_time_seconds", "Submission to admission into the batch", ["model"],
                                    buckets=LATENCY, registry=r)
        # per client: a named API key's name, or "anonymous" for every client known by its address alone
        self.client_chars = Counter("charlstm_client_generated_chars", "Characters generated, by client", ["model", "client"],
                                    registry=r)
        self.client_queue_time = Histogram("charlstm_client_queue_time_seconds", "Submission to a row, by client",
                                           ["model", "client"], buckets=LATENCY, registry=r)
        self.client_refusals = Counter("charlstm_client_refusals", "Requests the engine refused, by client and reason "
                                       "(overloaded, over_share, client_limit)", ["client", "reason"], registry=r)
        self.paused = Counter("charlstm_paused_rows", "Rows paused for a client owed its share of the rows (they resume later, "
                              "unchanged)", ["model"], registry=r)
        self.prompt_tokens = Counter("charlstm_prompt_tokens", "Prompt characters ingested", ["model"], registry=r)
        self.generated_tokens = Counter("charlstm_generated_tokens", "Characters generated", ["model"], registry=r)
        self.finished = Counter("charlstm_streams_finished", "Streams ended, by model and finish reason", ["model", "reason"], registry=r)
        self.disconnects = Counter("charlstm_client_disconnects", "Streams cancelled because the client went away", ["model"],
                                   registry=r)
        self.rejected = Counter("charlstm_rejected_requests", "Requests refused before queueing, by reason", ["reason"], registry=r)
        self.batch_size = Histogram("charlstm_batch_size", "Rows stepped together per engine step", ["model"], buckets=BATCH,
                                    registry=r)
        self.prefill_duration = Histogram("charlstm_prefill_slice_duration_seconds", "Prompt ingestion between two steps (one block of prompt slices)",
                                          ["model"], buckets=LATENCY, registry=r)
        self.step_duration = Histogram("charlstm_engine_step_duration_seconds", "One batched engine step", ["model"],
                                       buckets=FAST, registry=r)
        self.model_load = Histogram("charlstm_model_load_seconds", "Loading a model on first use: reading and checking its "
                                    "weights, building (for backend auto, measuring) its backend, starting its engine",
                                    ["model"], buckets=LATENCY, registry=r)
        self.model_unloads = Counter("charlstm_model_unloads", "Models unloaded, by reason (keep_alive, capacity, removed, shutdown)",
                                     ["model", "reason"], registry=r)
        self.session_removals = Counter("charlstm_session_removals", "Sessions removed: expired, evicted at the cap, or deleted",
                                        ["reason"], registry=r)
        self.sessions_created = Counter("charlstm_sessions_created", "Sessions created", registry=r)
        self.pool = PoolCollector(r)  # charlstm_running_streams, charlstm_waiting_streams, charlstm_model_loaded
        self.sessions = Gauge("charlstm_live_sessions", "Sessions held", registry=r)
        self.model = Info("charlstm_model", "The default model (a request that names none gets it)", registry=r)
        self.build = Info("charlstm_build", "The service version, the default model and its weights, and the torch it runs on", registry=r)
        # capacity: with the gauges above, saturation is a ratio on a dashboard (running / max_batch_size, ...)
        self.max_batch_size = Gauge("charlstm_max_batch_size", "Streams stepped together at most (max_batch_size)", registry=r)
        self.max_queue = Gauge("charlstm_max_queue", "Requests waiting for a row at most before 429 (max_queue)", registry=r)
        self.max_sessions = Gauge("charlstm_max_sessions", "Sessions held at most (max_sessions)", registry=r)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        for reason in SESSION_REMOVAL_REASONS:
            self.session_removals.labels(reason)
        self.store_seconds = Histogram("charlstm_session_store_seconds", "One session store call, by operation",
                                       ["operation"], buckets=FAST, registry=r)
        self.store_failures = Counter("charlstm_session_store_failures", "Session store calls that failed (store unreachable "
                                      "or broken), by operation", ["operation"], registry=r)
        for operation in SESSION_STORE_OPERATIONS:
            self.store_seconds.labels(operation)
            self.store_failures.labels(operation)
        self.snapshot_failures = Counter("charlstm_session_snapshot_failures", "Loads and writes of the session database "
                                         "that failed (no space, read-only, I/O error); the file keeps its last good "
                                         "snapshot", ["operation"], registry=r)
        for operation in ("load", "write"):
            self.snapshot_failures.labels(operation)
        self.not_durable = Counter("charlstm_session_changes_not_durable", "Acknowledged session changes (calls, creations, "
                                   "deletions) the session database could not take before their answer; they are kept in "
                                   "memory and written once the disk is back", registry=r)

    def attach(self, pool: ModelPool, session_store: SessionStore, settings: Settings) -> None:
        """Start reading the server's numbers: the pool's engines (each with its model's label) and the sessions."""
        self.pool.pool = pool
        self.sessions.set_function(session_store.known_count)
        default = pool.catalog.resolve(None)
        self.model.info({"name": default.name, "version": default.version, "parameters": str(default.card.get("num_parameters", ""))})
        self.build.info({"version": __version__, "model": default.ref, "weights_sha256": default.fingerprint[:16],
                         "torch": installed_version("torch") or "none"})
        self.max_batch_size.set(settings.max_batch_size)
        self.max_queue.set(settings.max_queue)
        self.max_sessions.set(settings.max_sessions)

    # the pool's observer (PoolObserver)
    def on_model_loaded(self, served: Served) -> None:
        model = served.ref
        for reason in FINISH_REASONS:  # every series from the start, so rate() sees the first event
            self.finished.labels(model, reason)
        for counter in (self.prompt_tokens, self.generated_tokens, self.disconnects):
            counter.labels(model)
        self.itl.labels(model)
        self.model_load.labels(model).observe(served.load_seconds)
        served.engine.add_observer(EngineObserver(self, model))

    def on_model_unloaded(self, served: Served, reason: str) -> None:
        self.model_unloads.labels(served.ref, reason).inc()


class ServerObserver:
    """The numbers no one model owns: sessions, their store, and refusals made before a model is chosen."""

    def __init__(self, m: Metrics):
        self.m = m

    def on_rejected(self, reason: str) -> None:
        self.m.rejected.labels(reason).inc()

    def on_client_refused(self, client: str, reason: str) -> None:
        self.m.client_refusals.labels(client, reason).inc()

    def on_session_created(self) -> None:
        self.m.sessions_created.inc()

    def on_session_removed(self, reason: str) -> None:
        self.m.session_removals.labels(reason).inc()

    def on_session_store_call(self, operation: str, seconds: float, failed: bool) -> None:
        self.m.store_seconds.labels(operation).observe(seconds)
        if failed:
            self.m.store_failures.labels(operation).inc()

    def on_session_snapshot_failed(self, operation: str) -> None:
        self.m.snapshot_failures.labels(operation).inc()

    def on_session_not_durable(self, changes: int) -> None:
        self.m.not_durable.inc(changes)


class EngineObserver(ServerObserver):
    """Implements the engine's EngineStats with Prometheus instruments, labelled with the engine's model."""

    def __init__(self, m: Metrics, model: str):
        super().__init__(m)
        self.model = model
        # the series the engine feeds every loop, looked up once (a labels() call costs as much as the observation)
        self._batch_size, self._step_duration = m.batch_size.labels(model), m.step_duration.labels(model)

    def on_step(self, batch_size: int, seconds: float, steps: int = 1) -> None:
        batch, step = self._batch_size, self._step_duration
        for _ in range(steps):  # a look of k steps counts as k steps of its mean duration
            batch.observe(batch_size)
            step.observe(seconds / steps)

    def on_prefill(self, chars: int, seconds: float) -> None:
        self.m.prefill_duration.labels(self.model).observe(seconds)

    def on_queue_time(self, seconds: float) -> None:
        self.m.queue_time.labels(self.model).observe(seconds)

    def on_client_queue_time(self, client: str, seconds: float) -> None:
        self.m.client_queue_time.labels(self.model, client).observe(seconds)

    def on_paused(self, rows: int) -> None:
        self.m.paused.labels(self.model).inc(rows)

    def on_client_served(self, served: dict[str, int]) -> None:
        for client, chars in served.items():
            self.m.client_chars.labels(self.model, client).inc(chars)

    def on_first_token(self, seconds: float) -> None:
        self.m.ttft.labels(self.model).observe(seconds)

    def on_inter_token(self, gaps: list[float], counts: list[int]) -> None:
        self.m.itl.observe_counted(self.model, gaps, counts)

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.m.finished.labels(self.model, reason).inc()
        self.m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.m.generated_tokens.labels(self.model).inc(completion_tokens)
        if reason == "cancelled":
            self.m.disconnects.labels(self.model).inc()


class RequestMetrics:
    """Counts every HTTP request by route template, method and status, and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Callable[[], list[BaseRoute]]):
        self.app, self.m, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        unrouted = dict(scope)  # routing rewrites the scope (a mount moves root_path): match against the original

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or route_template(self.routes(), unrouted)
            self.m.requests.labels(route, scope["method"], str(status)).inc()
            self.m.request_duration.labels(route).observe(time.perf_counter() - t0)


def route_template(routes: list[BaseRoute], scope: Scope) -> str:
    """The path template of the route a request is for, found by matching the app's routes.

    FastAPI puts the route into the scope only for its own API routes; plain Starlette routes (/openapi.json),
    mounts (the docs assets) and replies sent before routing (413 from the body limit) need this.
    A route that matches the path but not the method (405) counts under that route too.
    """
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.NONE:
            continue
        template = _template(route, scope)
        if match == Match.FULL:
            return template
        partial = partial or template
    return partial or "unmatched"


def _template(route: BaseRoute, scope: Scope) -> str:
    included = getattr(route, "original_router", None)  # FastAPI keeps an included router whole, as one route
    if included is not None:
        return route_template(included.routes, scope)
    path = getattr(route, "path", None) or "unmatched"
    return path + "/{path}" if isinstance(route, Mount) else path


def sample_sum(exposition: str, name: str, labels: str = "") -> float:
    """The sum of the samples named `name` in a /metrics text whose labels include `labels` (`a="x",b="y"`):
    a series by model, asked for without the model, is summed over the models. What the tests and the
    scaled stack's check read; 0 when there is none."""
    wanted = next(text_string_to_metric_families(f"wanted{{{labels}}} 0\n")).samples[0].labels if labels else {}
    return sum(sample.value for family in text_string_to_metric_families(exposition) for sample in family.samples
               if sample.name == name and wanted.items() <= sample.labels.items()) + 0.0


def instrument(app: FastAPI) -> Metrics:
    """The metrics, counted by every request and served at /metrics; the composition root (service/server.py)
    hands them the pool's and the sessions' events."""
    disable_created_metrics()  # the *_created series only add noise to every scrape
    metrics = Metrics()
    app.add_middleware(RequestMetrics, metrics=metrics, routes=lambda: app.router.routes)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], tags=["probes"],
                      summary="Prometheus metrics", response_class=Response)
    return metrics

