"""Liveness, readiness and what this server is running."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...sampling import MAX_SEED
from ..errors import error_response
from ..native.models import ErrorResponse

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
    engine = getattr(request.app.state, "engine", None)
    snap = engine.snapshot() if engine is not None else None
    if snap is None or not snap.ready:
        reason = "shutting down" if snap is not None and snap.draining else "failed" if snap is not None and snap.failed else "not ready"
        type_ = "engine_error" if snap is not None and snap.failed else "not_ready"
        return error_response(503, type_, f"the server is {reason}", None, {"Retry-After": "1"})
    store = request.app.state.store_health.status()  # from memory: a probe never waits on the store
    persistence = getattr(request.app.state, "persistence", None)
    if persistence is not None:
        store["persistence"] = persistence.status()
    return {"status": "ready", "running": snap.running, "waiting": snap.waiting, "session_store": store}


@router.get("/info")
async def info(request: Request):
    """The model, its vocabulary and figures, and the limits and defaults in force."""
    state = request.app.state
    loaded, s = getattr(state, "loaded", None), state.settings
    out = {"model": None, "limits": {
        "max_batch_size": s.max_batch_size, "max_queue": s.max_queue, "max_new_tokens": s.max_new_tokens,
        "max_prompt_chars": s.max_prompt_chars, "max_score_chars": s.max_score_chars, "max_stop_strings": s.max_stop_strings, "max_stop_chars": s.max_stop_chars,
        "max_sessions": s.max_sessions, "max_session_ttl_s": s.max_session_ttl_s, "max_body_bytes": s.max_body_bytes,
        "max_seed": MAX_SEED, "max_rows_per_request": state.engine.config.rows_per_request if getattr(state, "engine", None) else s.max_rows_per_request,
        "max_request_work_chars": s.request_work_limit, "max_logprob_entries": s.max_logprob_entries,
        "max_connections": s.max_connections, "max_header_bytes": s.max_header_bytes, "header_timeout_s": s.header_timeout_s,
        "body_timeout_s": s.body_timeout_s, "send_timeout_s": s.send_timeout_s, "keep_alive_s": s.keep_alive_s},
        "engine": {"quantize": _weights(state, s), "backend": getattr(state, "backend", None), "device": getattr(state, "device", None) or s.device,
                   "device_name": getattr(state, "device_name", None), "max_batch_size": s.max_batch_size,
                   "step_workers": getattr(state, "step_workers", None) or s.step_workers, "prefill_chunk": s.prefill_chunk,
                   "rows_per_call": getattr(state, "rows_per_call", None),
                   "prefill_budget": max(s.prefill_budget, s.prefill_chunk),
                   "decode_steps": getattr(state, "decode_steps", None) or s.decode_steps},
        "sessions": _sessions(state),
        "defaults": {"max_new_tokens": s.default_max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "repetition_penalty": 1.0, "session_ttl_s": s.session_ttl_s}}
    if loaded is not None:
        card = loaded.card
        out["model"] = {"name": loaded.name, "version": loaded.version, "parameters": card.get("num_parameters"),
                        "config": card.get("config"), "vocab": loaded.vocab.chars, "vocab_size": len(loaded.vocab),
                        "metrics": card.get("metrics"), "corpus": card.get("corpus"), "created_at": card.get("created_at"),
                        "state_floats_per_session": loaded.model.config.state_floats()}
        if "calibration" in card:  # the served distribution is the parent's with its logits divided by T
            out["model"]["calibration"] = {k: card["calibration"].get(k) for k in ("parent", "temperature")}
    return out


def _sessions(state) -> dict:
    """The store's kind and, for the embedded store, the state of its snapshots (degraded or ok)."""
    store, persistence = getattr(state, "session_store", None), getattr(state, "persistence", None)
    return {"store": store.kind if store is not None else None,
            "persistence": persistence.status() if persistence is not None else None}


def _weights(state, s) -> str | None:
    """The serving backend's step weights as the quantize setting names them (none, int8)."""
    backend = getattr(state, "backend", None)
    if backend is None:
        return s.quantize
    return "int8" if backend["weights"] == "int8" else "none"
