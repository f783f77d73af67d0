"""What the OpenAI routes share: the model list, the bounds on choices, usage, failures.

One serving module per route family, as vLLM's OpenAI server has: `OpenAIServingModels` here for
/v1/models, `completions.py` for /v1/completions, `chat.py` for /v1/chat/completions. Everything
OpenAI-specific (field names, `n` and list prompts, `echo`, the logprobs objects, `[DONE]`) stays in
this package; the request path is the shared one (validate -> reader -> formatter).
"""

from __future__ import annotations

import contextlib
from datetime import datetime

from ...engine.types import Done
from ...settings import Settings
from ...engine.pool import Catalog
from ..errors import APIError
from ..native.formatter import failed
from ..reader import Choice


def choice_bounds(settings: Settings) -> tuple[int, int]:
    """The most choices per prompt, and the most prompts: together never more streams than the engine
    admits at once, so a request that fits the OpenAPI document is never refused for its size."""
    most_n = min(128, settings.max_batch_size)
    return most_n, max(1, (settings.max_batch_size + settings.max_queue) // most_n)


class OpenAIServingModels:
    """The models this server serves, as /v1/models lists them: every servable version, loaded or not
    (a request loads it); a bare name is accepted as `model` too and means its newest version."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def list(self) -> dict:
        return {"object": "list", "data": [self.card(m) for m in self.catalog.models.values()]}

    def retrieve(self, model_id: str) -> dict:
        """One model, by any name a request accepts (a bare name: its newest version, whose id it shows);
        an unknown one raises ModelNotFound (404 model_not_found)."""
        return self.card(self.catalog.resolve(model_id))

    @staticmethod
    def card(m) -> dict:
        return {"id": m.ref, "object": "model", "created": _unix(m.card.get("created_at")), "owned_by": "charlstm",
                "root": m.ref, "parent": None}


def usage(choices: list[Choice]) -> dict:
    """Each prompt counts once however many choices it has, as OpenAI counts it."""
    prompt = sum(c.done.prompt_tokens for c in choices if c.first)
    completion = sum(c.done.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def failure(done: Done) -> APIError:
    if done.finish_reason == "error":
        return failed(done)
    return APIError(503, "shutting_down", "the server is shutting down; the completion did not finish", None, {"Retry-After": "1"})


def raise_if_failed(done: Done) -> None:
    if done.finish_reason not in ("length", "stop"):
        raise failure(done)


def check_choices(n: int, prompts: int, settings: Settings) -> None:
    most_n, most_prompts = choice_bounds(settings)
    if n > most_n:
        raise APIError(422, "invalid_field", f"n: {n} is more than {most_n} (max_batch_size)", "n")
    if prompts > most_prompts:
        raise APIError(422, "invalid_field", f"prompt: {prompts} prompts is more than {most_prompts}: "
                       f"(max_batch_size + max_queue) // {most_n} keeps every choice within the engine's queue", "prompt")


def _unix(value) -> int:
    """The model card's creation time (ISO 8601 or unix seconds) as unix seconds; 0 when unknown."""
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    return 0
