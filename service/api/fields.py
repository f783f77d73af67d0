"""Field types every protocol's models share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..engine.constraints import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_PATTERN_CHARS
from ..sampling import CONTROLS, control_type, controls_for


def _integral(value):
    """JSON has one number type: 744.0 is an integer there, so accept it as one (and only it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**bounds):  # noqa: N802 - reads as a type in annotations
    """An integer with bounds; the bounds go inside, so the OpenAPI document shows them as minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


MAX_BIAS = 100.0  # OpenAI's bound; -100 means never

LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)]],
    Field(max_length=4096, description="character id (as /tokenize gives it, a string key) -> a bias added to its logit, "
                                       "-100 to 100; -100 means never"),
    BeforeValidator(lambda v: {k: float(x) if type(x) is int else x for k, x in v.items()} if isinstance(v, dict) else v)]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: the generated text matches `regex`, is one of `choice`, or is JSON that
    `json` (a JSON schema) allows, or any JSON object (`json_object`). One of them."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    regex: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS,
                              description="a regular expression (Python syntax) the whole generated text must match")
    choice: list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES, description="the generated text is exactly one of these")
    json_schema: dict | None = Field(None, alias="json", description="a JSON schema the generated text is an instance of "
                                     "(its braces, quotes and digits outside the model's vocabulary are written for it)")
    json_object: bool | None = Field(None, description="true: the generated text is a JSON object")

    def kinds(self) -> list[str]:
        """The constraints this asks for (one is served)."""
        return [name for name, value in (("regex", self.regex), ("choice", self.choice), ("json", self.json_schema),
                                         ("json_object", self.json_object or None)) if value is not None]


# ---------------------------------------------------------------- sampling controls
# Every control's field comes from its one statement in service/sampling.py (`control`): its bounds, default
# and words. The native routes take the controls with `native`, the /v1 routes those with `openai` (there
# every field is optional, null meaning the default, as OpenAI's clients send them).

def _control_field(f, protocol: str):
    """(annotation, FieldInfo) of one SamplingParams field in `protocol` ("native" or "openai")."""
    meta = f.metadata
    override = meta["openai"] if protocol == "openai" and isinstance(meta["openai"], dict) else {}
    bounds = {**meta["bounds"], **{k: v for k, v in override.items() if k != "doc"}}
    doc = override.get("doc", meta["doc"] if protocol == "native" or f.name in OPENAI_OWN else f"extension: {meta['doc']}")
    kind = Int(**bounds) if control_type(f) is int else Annotated[float, Field(allow_inf_nan=False, **bounds)]
    if protocol == "openai":
        return kind | None, Field(f.default, description=doc)
    return kind, Field(f.default, description=doc)


OPENAI_OWN = {"temperature", "top_p", "presence_penalty", "frequency_penalty"}  # OpenAI's own fields; the rest extensions


def control_fields(protocol: str) -> dict:
    """name -> (annotation, FieldInfo) for every control `protocol` takes, in SamplingParams' order."""
    return {f.name: _control_field(f, protocol) for f in controls_for(protocol)}


def controls_of(request: BaseModel) -> dict:
    """The controls a request carries, by name (None: the default), for `validate.sampling_params`."""
    return {name: getattr(request, name) for name in CONTROLS if name in type(request).model_fields}
