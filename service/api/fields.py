"""Field types every protocol's models share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..engine.constraints import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_PATTERN_CHARS


def _integral(value):
    """JSON has one number type: 744.0 is an integer there, so accept it as one (and only it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**bounds):  # noqa: N802 - reads as a type in annotations
    """An integer with bounds; the bounds go inside, so the OpenAPI document shows them as minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: the generated text matches `regex`, or is one of `choice`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    regex: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS,
                              description="a regular expression (Python syntax) the whole generated text must match")
    choice: list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES, description="the generated text is exactly one of these")
