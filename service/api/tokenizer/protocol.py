"""The tokenizer endpoints' bodies, in vLLM's shapes. A token is one character; its id is its index in
the model's vocabulary."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ..openai.protocol import ChatMessage, Speakers


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenizeCompletion(_Strict):
    model: str | None = Field(None, description="when given, a name /v1/models lists")
    prompt: str = Field(description="the text to turn into token ids")
    add_special_tokens: bool = Field(True, description="accepted: this vocabulary has no special tokens")
    return_token_strs: bool | None = Field(False, description="also return each token as text")


class TokenizeChat(_Strict):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    add_generation_prompt: bool = Field(True, description="end with the assistant's speaker line, as /v1/chat/completions does")
    add_special_tokens: bool = Field(False, description="accepted: this vocabulary has no special tokens")
    return_token_strs: bool | None = False
    speakers: Speakers | None = Field(None, description="as for /v1/chat/completions")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="the longest prompt the server takes (max_prompt_chars): an LSTM has no window")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=1_000_000)]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str = "CharVocab"
    vocab: dict[str, int] = Field(description="each character and its id")
    vocab_size: int
    model_max_length: int
    bos_token: str | None = None
    eos_token: str | None = Field(None, description="none: a character model has no special tokens")
    pad_token: str | None = None
    unk_token: str | None = None
    special_tokens: list[str] = Field(default_factory=list)
    chat_template: str = Field(description="Jinja: the play-script template /v1/chat/completions renders (speakers "
                               "default to the server's)")
    default_speakers: dict[str, str]
