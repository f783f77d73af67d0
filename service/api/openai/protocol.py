"""OpenAI's Completions wire format as pydantic models, apart from the engine's request type.

Field names, defaults and bounds follow OpenAI's API reference; where it is silent, vLLM's OpenAI
server. One token is one character. Unknown fields are refused (400), so a client never believes an
option it sent took effect when this server does not know it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model, model_validator

from ...sampling import MAX_SEED
from ..fields import Int, LogitBias, StructuredOutputs, control_fields, controls_of
from .errors import ERROR_TYPES, V1_PREFIX, OpenAIErrorDetail, OpenAIErrorResponse, error_body, is_v1  # noqa: F401 (the protocol's face)

MAX_TOP_LOGPROBS = 5  # OpenAI's own bound on `logprobs`
MAX_STOP = 4  # OpenAI's bound on stop sequences
SPEECH_END = "\n\n"  # a blank line ends a speech in the corpus's layout (chat.py)


# ---------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


StopString = Annotated[str, Field(min_length=1)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP),
                     BeforeValidator(lambda v: [] if v is None else [v] if isinstance(v, str) else v),
                     WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1},
                                               {"type": "array", "items": {"type": "string", "minLength": 1},
                                                "maxItems": MAX_STOP},
                                               {"type": "null"}]})]
PromptList = Annotated[list[str], Field(min_length=1, max_length=1024)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]  # one prompt as token ids (one character each)
TokenPromptList = Annotated[list[TokenIds], Field(min_length=1, max_length=1024)]


# The sampling fields completions and chat share, with OpenAI's bounds (and vLLM's extensions).


class _Harmless(_Strict):
    """Fields OpenAI clients send as a matter of course, accepted with the values that change nothing here
    (as vLLM accepts them) and ignored; another value is a 400 that names what is not supported."""

    store: Literal[False] | None = Field(None, description="accepted as false and ignored: nothing is stored")
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = Field(
        None, description="accepted and ignored")
    service_tier: Literal["auto", "default"] | None = Field(None, description="accepted and ignored: one tier")


class TextFormat(_Strict):
    type: Literal["text"] = Field(description="plain text, the default")


class JsonObjectFormat(_Strict):
    type: Literal["json_object"] = Field(description="a JSON object (values: scalars, arrays of scalars, objects of scalars)")


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema the reply is an instance of; "
                                 "omitted: any JSON object")
    strict: bool | None = Field(None, description="true or false alike: the reply always follows the schema")


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class _Formatted(BaseModel):
    """OpenAI's `response_format` beside vLLM's `structured_outputs`: either one constrains the text."""

    response_format: ResponseFormat | None = Field(None, description="text (the default), json_object, or json_schema; "
                                                   "a JSON reply's braces, quotes and digits, which are outside the model's "
                                                   "vocabulary, are written for it")
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        if self.response_format is not None and self.response_format.type != "text" and self.structured_outputs is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def structured(self) -> tuple[StructuredOutputs | None, str]:
        """The constraint asked for, and the field that asked for it (for messages)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return self.structured_outputs, "structured_outputs"
        if fmt.type == "json_object":
            return StructuredOutputs(json_object=True), "response_format"
        spec = fmt.json_schema.schema_
        return (StructuredOutputs(json_object=True) if spec is None else StructuredOutputs(json=spec)), "response_format"


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with `usage` and no choices before [DONE]")


# temperature, top_p, presence and frequency penalties (OpenAI's), and top_k, min_p, repetition_penalty
# (extensions, as vLLM takes them through the body): service/sampling.py states them, fields.py makes the fields
SamplingControls = create_model("SamplingControls", __base__=_Strict, **control_fields("openai"))


class CompletionRequest(_Harmless, _Formatted, SamplingControls):
    model: str | None = Field(None, description="`name@version` from /v1/models, or the bare name; omitted: the server's "
                              "default model")
    prompt: str | PromptList | TokenIds | TokenPromptList = Field(
        description="a string, a list of strings, token ids (a list of integers: see /tokenize) or a list of such lists: "
                    "one set of `n` choices per prompt")
    max_tokens: Int(ge=0) | None = Field(16, description="characters to generate, at most max_new_tokens in /info; 0 with "
                                         "`echo` scores the prompt")
    n: Int(ge=1, le=128) | None = Field(1, description="choices per prompt")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(
        None, description="the sampled character's log-probability plus this many most likely alternatives at each position")
    echo: bool | None = Field(False, description="return the prompt before the completion (with its log-probabilities "
                              "when `logprobs` is set; the first is null)")
    stop: StopList = Field(default_factory=list, description="up to 4 strings; generation ends before the first one")
    seed: Int(ge=0, le=MAX_SEED) | None = Field(None, description="same seed, same text (as /generate); choice i of a "
                                                "prompt uses seed + i")
    user: str | None = Field(None, description="accepted and ignored")
    # extensions, as vLLM takes them through the body (the `openai` client's extra_body)
    session_id: str | None = Field(None, min_length=1, max_length=256,
                                   description="extension: continue a native session (one prompt, n = 1); the session advances")
    structured_outputs: StructuredOutputs | None = Field(None, description="extension (vLLM's): constrain the text to a "
                                                         "regex, a list of choices or JSON")
    logit_bias: LogitBias | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        if isinstance(self.prompt, str) or (isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if isinstance(self.prompt, list) and not self.prompt:
            return [[]]  # an empty list of token ids: the empty prompt
        return self.prompt

    def to_inputs(self):
        """This request as the engine's inputs (service/api/validate.py)."""
        from ..validate import EngineInputs

        structured, structured_param = self.structured()
        return EngineInputs(
            prompts=self.prompts, n=self.n or 1, max_tokens=16 if self.max_tokens is None else self.max_tokens,
            sampling={**controls_of(self), "top_logprobs": self.logprobs},
            seed=self.seed, stop=tuple(self.stop), logprobs=self.logprobs is not None,
            prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None,
            stream=bool(self.stream), structured=structured, structured_param=structured_param, logit_bias=self.logit_bias,
            max_tokens_param="max_tokens", unknown_hint="")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="system and developer messages become "
                                                                                  "the prologue; the others speeches")

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value):
        """Say plainly what is not served, rather than list every way the content failed to be text."""
        if isinstance(value, dict):
            content = value.get("content")
            if isinstance(content, list):
                for i, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind != "text":
                        raise ValueError(f"content.{i}: a {kind!r} part is not supported: this model reads text parts only")
            if content is None and value.get("tool_calls"):
                raise ValueError("tool_calls are not supported (this model calls no tools): send the message's text as content")
        return value

    content: str | Annotated[list[TextPart], Field(max_length=256)] = Field(description="text, or a list of text parts")
    name: str | None = Field(None, max_length=256, description="accepted and ignored (the speakers are set in `speakers`)")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class Speakers(_Strict):
    user: str | None = Field(None, min_length=1, max_length=64, description="the speaker of the user's messages")
    assistant: str | None = Field(None, min_length=1, max_length=64, description="the speaker whose speech the model writes")


class ChatCompletionRequest(_Harmless, _Formatted, SamplingControls):
    model: str | None = Field(None, description="`name@version` from /v1/models, or the bare name; omitted: the server's "
                              "default model")
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: Int(ge=0) | None = Field(None, description="characters to generate (deprecated by OpenAI "
                                                        "for max_completion_tokens); default in /info")
    max_completion_tokens: Int(ge=0) | None = Field(None, description="characters to generate, at most max_new_tokens in /info")
    n: Int(ge=1, le=128) | None = Field(1, description="choices")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(False, description="each generated character's log-probability")
    top_logprobs: Int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(None, description="with logprobs: this many most likely "
                                                                "alternatives at each position")
    stop: StopList = Field(default_factory=list, description="up to 4 strings; the speech also ends at a blank line")
    seed: Int(ge=0, le=MAX_SEED) | None = Field(None, description="same seed, same text (as /generate with the rendered "
                                                "prompt); choice i uses seed + i")
    user: str | None = Field(None, description="accepted and ignored")
    # extensions, as vLLM takes them through the body (the `openai` client's extra_body)
    speakers: Speakers | None = Field(None, description="extension: the speakers of this conversation (defaults in /info "
                                      "and /tokenizer_info)")
    unknown_chars: Literal["error", "skip", "replace"] = Field("error", description="extension: characters of the messages "
                                                               "outside the vocabulary: error (400), skip or replace them")
    replacement: str = Field(" ", min_length=1, max_length=1, description="extension: with unknown_chars=replace")
    structured_outputs: StructuredOutputs | None = Field(None, description="extension (vLLM's): constrain the reply to a "
                                                         "regex, a list of choices or JSON")
    logit_bias: LogitBias | None = None
    # sent by clients with values that change nothing: no tools are served
    tools: Annotated[list, Field(max_length=0)] | None = Field(None, description="none: this model calls no tools")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="accepted and ignored: there are no tools")
    parallel_tool_calls: bool | None = Field(None, description="accepted and ignored: there are no tools")

    def to_inputs(self, prompt: str, default_max_tokens: int):
        """This request as the engine's inputs, its messages already rendered by the chat template."""
        from ..validate import EngineInputs

        max_tokens = next((v for v in (self.max_completion_tokens, self.max_tokens) if v is not None), default_max_tokens)
        structured, structured_param = self.structured()
        return EngineInputs(
            prompts=[prompt], n=self.n or 1, max_tokens=max_tokens,
            sampling={**controls_of(self), "top_logprobs": self.top_logprobs},
            seed=self.seed, stop=tuple(self.stop), protocol_stop=(SPEECH_END,), logprobs=bool(self.logprobs), stream=bool(self.stream),
            unknown_chars=self.unknown_chars, replacement=self.replacement, structured=structured,
            structured_param=structured_param, logit_bias=self.logit_bias, prompt_param="messages", max_tokens_param="max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens",
            unknown_hint=" (or send unknown_chars: skip or replace)")


# ---------------------------------------------------------------- responses
class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["length", "stop"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None
    finish_reason: Literal["length", "stop"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "charlstm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# Server-Sent Events as the OpenAPI document describes them: `data:` lines holding a chunk, then [DONE].
STREAM_EVENT = {"type": "object", "required": ["data"],
                "properties": {"data": {"type": "string", "description": "JSON: a CompletionResponse-shaped chunk "
                                        "(or {error}); the last event is the literal [DONE]"}}}
STREAM_RESPONSE = {200: {"description": "JSON, or with stream=true Server-Sent Events",
                         "content": {"text/event-stream": {"schema": {"type": "array", "items": STREAM_EVENT},
                                                           "itemSchema": STREAM_EVENT}}}}
