"""Liveness, readiness and what this server is running."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...sampling import MAX_SEED, controls_for
from ..errors import error_response
from ..native.models import ErrorResponse
from ..services import services_of

router = APIRouter(tags=["probes"])


@router.get("/health")
async def health():
    """200 while the process runs."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(request: Request):
    """200 once the model is loaded and the engine is stepping; 503 before that, while shutting down,
    and after the engine failed. The body reports the session store's state as the background sweep
    last saw it (never by asking the store now); a store that is away does not take the server out,
    since plain generation does not need it."""
    services = services_of(request.app)
    pool = services.pool if services is not None else None
    ok, reason = pool.ready() if pool is not None and pool.started else (False, "not ready")
    if not ok:
        type_ = "engine_error" if reason == "failed" else "not_ready"
        return error_response(503, type_, f"the server is {reason}", None, {"Retry-After": "1"})
    store = services.store_health.status()  # from memory: a probe never waits on the store
    if services.persistence is not None:
        store["persistence"] = services.persistence.status()
    running, waiting = pool.counts()
    return {"status": "ready", "running": running, "waiting": waiting, "loaded_models": list(pool.loaded),
            "session_store": store}


@router.get("/info")
async def info(request: Request):
    """The default model (its vocabulary and figures), every servable model, and the limits and defaults in force."""
    state = request.app.state
    services = services_of(request.app)
    s, pool = state.settings, services.pool if services is not None else None
    default = pool.catalog.resolve(None) if pool is not None and pool.started else None
    served = pool.loaded.get(default.ref) if default is not None else None
    details = served.details if served is not None else {}
    loaded = served.loaded if served is not None else None
    out = {"model": None, "limits": {
        "max_batch_size": s.max_batch_size, "max_queue": s.max_queue, "max_new_tokens": s.max_new_tokens,
        "max_prompt_chars": s.max_prompt_chars, "max_score_chars": s.max_score_chars, "max_stop_strings": s.max_stop_strings, "max_stop_chars": s.max_stop_chars,
        "max_sessions": s.max_sessions, "max_session_ttl_s": s.max_session_ttl_s, "max_body_bytes": s.max_body_bytes,
        "max_seed": MAX_SEED, "max_rows_per_request": served.engine.config.rows_per_request if served else s.max_rows_per_request,
        "max_request_work_chars": s.request_work_limit, "max_logprob_entries": s.max_logprob_entries,
        "max_connections": s.max_connections, "max_header_bytes": s.max_header_bytes, "header_timeout_s": s.header_timeout_s,
        "body_timeout_s": s.body_timeout_s, "send_timeout_s": s.send_timeout_s, "keep_alive_s": s.keep_alive_s},
        "engine": {"quantize": _weights(details.get("backend"), s), "backend": details.get("backend"),
                   "device": details.get("device") or s.device, "device_name": details.get("device_name"),
                   "max_batch_size": s.max_batch_size, "step_workers": details.get("step_workers") or s.step_workers,
                   "prefill_chunk": s.prefill_chunk, "rows_per_call": details.get("rows_per_call"),
                   "prefill_rows": s.prefill_rows,
                   "decode_steps": details.get("decode_steps") or s.decode_steps,
                   "quiet_steps": served.engine.config.quiet_steps if served else s.quiet_steps},
        "models": _models(pool) if pool is not None else [],
        "model_pool": {"max_loaded_models": s.max_loaded_models, "model_keep_alive_s": s.model_keep_alive_s,
                       "models": s.models or "default"},
        "sessions": _sessions(services),
        "defaults": {"max_new_tokens": s.default_max_new_tokens,
                     **{f.name: f.default for f in controls_for("native")}, "session_ttl_s": s.session_ttl_s}}
    if loaded is not None:
        card = loaded.card
        out["model"] = {"name": loaded.name, "version": loaded.version, "parameters": card.get("num_parameters"),
                        "config": card.get("config"), "vocab": loaded.vocab.chars, "vocab_size": len(loaded.vocab),
                        "metrics": card.get("metrics"), "corpus": card.get("corpus"), "created_at": card.get("created_at"),
                        "state_floats_per_session": loaded.config.state_floats()}
        if "calibration" in card:  # the served distribution is the parent's with its logits divided by T
            out["model"]["calibration"] = {k: card["calibration"].get(k) for k in ("parent", "temperature")}
    return out


def _sessions(services) -> dict:
    """The store's kind and, for the embedded store, the state of its snapshots (degraded or ok)."""
    store, persistence = (services.session_store, services.persistence) if services is not None else (None, None)
    return {"store": store.kind if store is not None else None,
            "persistence": persistence.status() if persistence is not None else None}


def _models(pool) -> list[dict]:
    """Every servable model with its card's figures, and whether (and how fast) it is loaded now."""
    default = pool.catalog.resolve(None).ref
    out = []
    for model in pool.catalog.models.values():
        card, served = model.card, pool.loaded.get(model.ref)
        out.append({"id": model.ref, "name": model.name, "version": model.version, "default": model.ref == default,
                    "loaded": served is not None, "load_seconds": round(served.load_seconds, 3) if served else None,
                    "backend": served.details["backend"]["name"] if served else None,
                    "parameters": card.get("num_parameters"), "metrics": card.get("metrics"), "corpus": card.get("corpus"),
                    "created_at": card.get("created_at")})
    return out


def _weights(backend: dict | None, s) -> str | None:
    """The serving backend's step weights as the quantize setting names them (none, int8)."""
    if backend is None:
        return s.quantize
    return "int8" if backend["weights"] == "int8" else "none"
