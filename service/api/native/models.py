"""The native protocol's request and response bodies. Hard bounds live here (and so in the OpenAPI document); limits that
depend on the settings are checked in the routes and shown in /info."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model

from ...sampling import MAX_SEED
from ..fields import Int, LogitBias, StructuredOutputs, control_fields, controls_of


StopString = Annotated[str, Field(min_length=1)]
Seed = Int(ge=0, le=MAX_SEED)
UnknownChars = Literal["error", "skip", "replace"]
# OpenAI's clients send a stop as one string or a list of strings: both are accepted, as a list.
StopList = Annotated[list[StopString], BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
                     WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1},
                                               {"type": "array", "items": {"type": "string", "minLength": 1}}]})]
TTL = Annotated[float, Field(ge=1, allow_inf_nan=False)]  # the upper bound is the setting in force (in /info and the OpenAPI document)


MODEL_FIELD = "name (its newest version), name@version, or omitted for the server's default model; GET /v1/models lists them"


class _Strict(BaseModel):
    """Unknown fields and wrong types are errors: "5" is not a number, true is not an integer."""

    model_config = ConfigDict(extra="forbid", strict=True)


# temperature, top_k, top_p, min_p, repetition_penalty: service/sampling.py states them, fields.py makes the fields
SamplingControls = create_model("SamplingControls", __base__=_Strict, **control_fields("native"))


class GenerateRequest(SamplingControls):
    model: str | None = Field(None, min_length=1, max_length=256,
                              description=MODEL_FIELD + "; on a session, its own model (naming another is 409 model_mismatch)")
    prompt: str = Field("", description="text to continue; may be empty. Every character must be in the model's vocabulary")
    max_new_tokens: Int(ge=0) | None = Field(None, description="characters to generate (a token is one character); default "
                                             "and limit in /info")
    seed: Seed | None = Field(None, description="same seed, same text; drawn at random when absent")
    stop: StopList = Field(default_factory=list,
                            description="a string or a list: generation ends at the first of these strings, which is not included in the text")
    stream: bool = Field(False, description="stream characters as Server-Sent Events")
    logprobs: bool = Field(False, description="return the natural log-probability of each generated character under the model")
    unknown_chars: UnknownChars = Field("error", description="prompt characters outside the vocabulary: error (422), skip them, "
                                        "or replace them with `replacement`")
    replacement: str = Field(" ", min_length=1, max_length=1, description="with unknown_chars=replace: a character of the vocabulary")
    structured_outputs: StructuredOutputs | None = Field(None, description="constrain the generated text: a regex it "
                                                         "matches, or a list of choices it is one of")
    logit_bias: LogitBias | None = None

    def to_inputs(self, default_max_new_tokens: int):
        """This request as the engine's inputs (service/api/validate.py)."""
        from ..validate import EngineInputs

        return EngineInputs(
            prompts=[self.prompt], n=1,
            max_tokens=default_max_new_tokens if self.max_new_tokens is None else self.max_new_tokens,
            sampling=controls_of(self),
            seed=self.seed, stop=tuple(self.stop), logprobs=self.logprobs, stream=self.stream,
            unknown_chars=self.unknown_chars, replacement=self.replacement, structured=self.structured_outputs,
            logit_bias=self.logit_bias)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class UnknownCharsReport(BaseModel):
    policy: UnknownChars
    count: int = Field(description="prompt characters skipped or replaced")


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["length", "stop", "cancelled", "shutdown", "error"]
    usage: Usage
    seed: int = Field(description="the seed in force (a session's, unless the request re-seeded it)")
    model: str
    logprobs: list[float] | None = None
    session: SessionInfo | None = None
    unknown_chars: UnknownCharsReport | None = None


class SessionCreate(_Strict):
    model: str | None = Field(None, min_length=1, max_length=256, description=MODEL_FIELD + "; the session belongs to it for good")
    prompt: str = Field("", description="text that primes the session's state; empty: the start character")
    seed: Seed | None = Field(None, description="seed of the session's random generator")
    ttl_seconds: TTL | None = Field(None, description="idle time before expiry; default and bound in /info")
    unknown_chars: UnknownChars = Field("error", description="as for /generate")
    replacement: str = Field(" ", min_length=1, max_length=1, description="as for /generate")


SESSION_FORMAT = "charlstm-session/1"
DURABLE_HEADER = "X-Session-Durable"  # on a deletion's 204 (no body): whether a crash could bring the session back
MAX_SESSION_DATA_CHARS = 1 << 22  # a hard bound on what is read; the OpenAPI document gives the serving model's exact length


class SessionExport(BaseModel):
    """A session as a value a client can hold: `data` is the signed binary blob, base64url."""

    format: Literal["charlstm-session/1"] = Field(SESSION_FORMAT, description="the blob format and its version")
    model: str = Field(description="name@version of the model that exported it (the blob binds the weights' sha256)")
    position: int = Field(description="characters consumed so far")
    backend: str | None = Field(None, description="the compute backend the exporting server draws with: "
                                "`charlstm sample --session-in` continues on it, so its text is this server's")
    data: str = Field(description="base64url (no padding): state, seed, counter, position, weights fingerprint, "
                      "creation time and an HMAC-SHA256 tag")


class SessionImport(_Strict):
    """An exported session (only `data` is needed; the other fields of an export are accepted as they are)."""

    data: str = Field(min_length=1, max_length=MAX_SESSION_DATA_CHARS, description="the `data` of an export, unchanged")
    format: Literal["charlstm-session/1"] | None = Field(None, description="when given, the export's format")
    model: str | None = Field(None, min_length=1, max_length=256,
                              description="the model to import into; omitted: the served model whose weights the blob names "
                                          "(another model's weights: 409 model_mismatch)")
    position: Int(ge=0, le=2**53 - 1) | None = Field(None, description="when given, must equal the blob's position")
    backend: str | None = Field(None, max_length=64, description="an export's backend: accepted and ignored")
    ttl_seconds: TTL | None = Field(None, description="idle time before expiry; default and bound in /info")


class SessionFork(_Strict):
    ttl_seconds: TTL | None = Field(None, description="idle time before expiry; default: the forked session's")


class SessionInfo(BaseModel):
    session_id: str
    model: str | None = Field(None, description="name@version of the model the session belongs to; null if it is not served here")
    position: int = Field(description="characters consumed so far")
    seed: int
    created_at: float = Field(description="unix time, seconds")
    last_used: float = Field(description="unix time, seconds")
    expires_at: float = Field(description="unix time, seconds")
    ttl_seconds: float
    busy: bool
    durable: bool | None = Field(None, description="in the answer to a change (a session call, create, import, fork): whether the change was "
                                 "made durable before this answer (session_fsync), so a crash of the server cannot take it "
                                 "back; false while the session file cannot be written (the change is kept in memory); "
                                 "null in a read")


class ScoreRequest(_Strict):
    model: str | None = Field(None, min_length=1, max_length=256, description=MODEL_FIELD + "; with session_id, the session's")
    text: str = Field(description="the text to score; every character must be in the model's vocabulary; bound in /info")
    session_id: str | None = Field(None, min_length=1, max_length=256,
                                   description="score after this session's state (then the first character counts too); "
                                               "the session does not advance")
    top_logprobs: Int(ge=0, le=5) | None = Field(None, description="also return this many most likely characters at each position")
    unknown_chars: UnknownChars = Field("error", description="characters outside the vocabulary: error (422), skip them, "
                                        "or replace them with `replacement`")
    replacement: str = Field(" ", min_length=1, max_length=1, description="with unknown_chars=replace: a character of the vocabulary")


class ScoreResponse(BaseModel):
    chars: int = Field(description="characters scored: every one after the first, or all of them after a session")
    nats_per_char: float | None = Field(description="mean negative log-probability; null when nothing was scored")
    bits_per_char: float | None
    logprobs: list[float] = Field(description="natural log-probability of each scored character")
    top_logprobs: list[dict[str, float]] | None = Field(None, description="the most likely characters at each scored "
                                                        "position, most likely first")
    unknown_chars: UnknownCharsReport | None = Field(None, description="with unknown_chars skip or replace: how many were")


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


GenerateResponse.model_rebuild()

# Server-Sent Events as the OpenAPI document describes them: each event is an object.
SSE_EVENT = {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"type": "string", "enum": ["token", "done", "error"]},
                            "data": {"type": "string", "description": "JSON: token {index, text[, logprobs]}; done {finish_reason, usage, seed, model}; error {error}"},
                            "id": {"type": "string"}, "retry": {"type": "integer"}}}
STREAM_RESPONSE = {200: {"description": "JSON, or with stream=true Server-Sent Events",
                         "content": {"text/event-stream": {"schema": {"type": "array", "items": SSE_EVENT},
                                                           "itemSchema": SSE_EVENT}}}}
