"""The OpenAPI document with the limits in force: bounds that come from the settings and the models'
vocabularies are written into the schema, so a client (or a fuzzer) sees exactly what is accepted.

With several models served the document is exact for the default model: the characters are its
vocabulary's, while `model` names every servable model and a session blob's length spans theirs."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..sessions.blob import text_chars
from .openai.serving import choice_bounds
from .services import services_of


def vocabulary_pattern(chars: str) -> str:
    """An ECMA-262 regex matching strings made only of `chars`."""
    return "^[" + "".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in chars) + "]*$"


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        services = services_of(app)
        settings, pool = app.state.settings, services.pool if services is not None else None
        if settings is None or pool is None or not pool.started:
            return schema  # before start-up: the static bounds only, and not cached
        comps = schema["components"]["schemas"]
        default, served = pool.catalog.resolve(None), list(pool.catalog.models.values())
        names = sorted({m.ref for m in served} | {m.name for m in served})
        pattern = vocabulary_pattern(default.vocab.chars)
        for name in ("GenerateRequest", "SessionCreate", "SessionImport", "ScoreRequest", "CompletionRequest",
                     "ChatCompletionRequest"):
            for branch in _branches(comps[name]["properties"]["model"], "string"):
                branch["enum"] = names
        for name in ("GenerateRequest", "SessionCreate"):
            comps[name]["properties"]["prompt"].update(maxLength=settings.max_prompt_chars)
            comps[name]["properties"]["replacement"].update(pattern=pattern.replace("]*$", "]$"))
            # Characters outside the vocabulary are an error only under the default policy; skip and replace take any.
            comps[name]["if"] = {"required": ["unknown_chars"], "properties": {"unknown_chars": {"enum": ["skip", "replace"]}}}
            comps[name]["else"] = {"properties": {"prompt": {"pattern": pattern}}}
        gen = comps["GenerateRequest"]["properties"]
        for branch in gen["max_new_tokens"].get("anyOf", [gen["max_new_tokens"]]):
            if branch.get("type") == "integer":
                branch["maximum"] = settings.max_new_tokens
        vocab_stop = {"maxLength": settings.max_stop_chars, "pattern": pattern.replace("]*$", "]+$")}
        for branch in gen["stop"].get("anyOf", [gen["stop"]]):
            if branch.get("type") == "array":
                branch["maxItems"] = settings.max_stop_strings
                branch["items"].update(vocab_stop)
            elif branch.get("type") == "string":
                branch.update(vocab_stop)
        for name in ("SessionCreate", "SessionImport", "SessionFork"):
            ttl = comps[name]["properties"]["ttl_seconds"]
            for branch in ttl.get("anyOf", [ttl]):
                if branch.get("type") == "number":
                    branch["maximum"] = settings.max_session_ttl_s
        # An export of this model is exactly this long; what else the blob must be (signed with this
        # server's key, of these weights) no schema can say.
        sizes = [text_chars(m.card["config"]["num_layers"], m.card["config"]["hidden_size"]) for m in served]
        comps["SessionImport"]["properties"]["data"].update(minLength=min(sizes), maxLength=max(sizes), pattern="^[A-Za-z0-9_-]*$")
        score = comps["ScoreRequest"]
        score["properties"]["text"].update(maxLength=settings.max_score_chars)
        score["properties"]["replacement"].update(pattern=pattern.replace("]*$", "]$"))
        _openai_bounds(comps["CompletionRequest"], settings, pattern, vocab_stop)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _branches(prop: dict, type_: str) -> list[dict]:
    return [b for b in prop.get("anyOf", [prop]) if b.get("type") == type_]


def _openai_bounds(schema: dict, settings, pattern: str, vocab_stop: dict) -> None:
    """/v1/completions: the limits in force on prompts, choices and stops."""
    props = schema["properties"]
    most_n, most_prompts = choice_bounds(settings)
    for branch in _branches(props["prompt"], "string"):
        branch.update(maxLength=settings.max_prompt_chars, pattern=pattern)
    for branch in _branches(props["prompt"], "array"):
        branch["maxItems"] = most_prompts
        branch["items"].update(maxLength=settings.max_prompt_chars, pattern=pattern)
    for branch in _branches(props["n"], "integer"):
        branch["maximum"] = most_n
    # A session is one stream: with session_id, one prompt and one choice.
    schema["if"] = {"required": ["session_id"], "properties": {"session_id": {"type": "string"}}}
    schema["then"] = {"properties": {"n": {"anyOf": [{"type": "integer", "maximum": 1}, {"type": "null"}]},
                                     "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 1}]}}}
    for branch in _branches(props["max_tokens"], "integer"):
        branch["maximum"] = settings.max_new_tokens
    for branch in _branches(props["stop"], "string"):
        branch.update(vocab_stop)
    for branch in _branches(props["stop"], "array"):
        branch["maxItems"] = min(branch.get("maxItems", settings.max_stop_strings), settings.max_stop_strings)
        branch["items"].update(vocab_stop)
