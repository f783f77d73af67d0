"""The one validation step between a protocol's request and the engine.

Each protocol's request model translates itself into `EngineInputs` (vLLM's `to_sampling_params`): the
prompts, how many choices, the sampling controls by their `SamplingParams` names, stops, figures to
report, a constraint. `validate` checks every limit that depends on the settings or the model, before
anything is queued, and builds one `GenerationRequest` per choice. A new sampling control is a field of
`SamplingParams` and of each protocol's model; nothing here changes.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass, field, fields

from ..engine.constraints import Constraint, ConstraintError, compile_choices, compile_json, compile_regex
from ..engine.types import GenerationRequest
from ..sampling import MAX_SEED, SamplingParams
from ..settings import Settings
from ..model.store import LoadedModel
from ..model.vocab import OutOfVocabularyError
from .errors import APIError
from .fields import MAX_BIAS, StructuredOutputs
from .reader import Choice

SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


@dataclass(frozen=True)
class EngineInputs:
    prompts: list[str | list[int]]  # text, or token ids (one character each)
    max_tokens: int
    sampling: dict = field(default_factory=dict)  # SamplingParams fields by name; None or absent: the default
    n: int = 1
    seed: int | None = None  # choice j of a prompt uses seed + j
    stop: tuple[str, ...] = ()  # the client's stop strings (bounded by the settings)
    protocol_stop: tuple[str, ...] = ()  # the protocol's own (chat: the blank line that ends a speech)
    logprobs: bool = False
    prompt_logprobs: int | None = None  # None: off; k: each prompt character's log-probability and k alternatives
    stream: bool = False
    unknown_chars: str = "error"
    replacement: str | None = None
    structured: StructuredOutputs | None = None
    structured_param: str = "structured_outputs"  # the field that asked for the constraint, for messages
    logit_bias: dict[str, float] | None = None  # character id (a string, as JSON keys are) -> bias
    prompt_param: str = "prompt"  # the request's field names, for messages
    max_tokens_param: str = "max_new_tokens"
    unknown_hint: str = " (or send unknown_chars: skip or replace)"


@dataclass
class Validated:
    choices: list[Choice]
    changed: int  # prompt characters the unknown-character policy skipped or replaced

    def unknown_report(self, inputs: EngineInputs) -> dict | None:
        return None if inputs.unknown_chars == "error" else {"policy": inputs.unknown_chars, "count": self.changed}


def sampling_params(values: dict) -> SamplingParams:
    """The one place a SamplingParams is built from a request: its fields by name, absent or None meaning the default."""
    return SamplingParams(**{name: values[name] for name in SAMPLING_FIELDS if values.get(name) is not None})


def encode_prompt(prompt: str, loaded: LoadedModel, settings: Settings, param: str = "prompt",
                  unknown: str = "error", replacement: str | None = None,
                  hint: str = " (or send unknown_chars: skip or replace)", bound: str = "max_prompt_chars") -> tuple[list[int], int]:
    """The prompt's ids and how many characters the unknown-character policy skipped or replaced.
    `bound`: the setting that limits the length."""
    limit = getattr(settings, bound)
    if len(prompt) > limit:
        raise APIError(422, "invalid_field", f"{param}: {len(prompt)} characters is more than {bound}={limit}", param)
    if replacement is not None and replacement not in loaded.vocab:
        raise APIError(422, "invalid_field", f"replacement: must be one character of the model's vocabulary, not {replacement!r}",
                       "replacement")
    try:
        return loaded.vocab.encode_with_policy(prompt, unknown, replacement)
    except OutOfVocabularyError as e:
        raise APIError(422, "invalid_field", f"{param}: {e}{hint}", param) from None


def check_token_ids(ids: list[int], loaded: LoadedModel, settings: Settings, param: str) -> list[int]:
    """Token ids as a prompt: each one an id of the vocabulary (400 otherwise, as vLLM answers)."""
    if len(ids) > settings.max_prompt_chars:
        raise APIError(422, "invalid_field", f"{param}: {len(ids)} tokens is more than max_prompt_chars={settings.max_prompt_chars}", param)
    size = len(loaded.vocab)
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < size), None)
    if bad is not None:
        raise APIError(400, "invalid_token", f"{param}.{bad}: token id {ids[bad]} is outside the vocabulary (0 to {size - 1}; "
                       "see /tokenizer_info)", f"{param}.{bad}")
    return ids


def check_max_new_tokens(max_new: int, settings: Settings, param: str = "max_new_tokens") -> None:
    if max_new > settings.max_new_tokens:
        raise APIError(422, "invalid_field", f"{param}: {max_new} is more than the limit {settings.max_new_tokens}", param)


def check_request_size(prompt_chars: list[int], choices: int, max_new: int, settings: Settings,
                       logprob_entries: int = 0) -> None:
    """A request's total work and its response's size within their limits. prompt_chars: each prompt's
    length; every prompt runs `choices` streams of up to `max_new` characters. logprob_entries: the
    log-probabilities the response would hold."""
    work = sum(prompt_chars) * choices + len(prompt_chars) * choices * max_new
    if work > settings.request_work_limit:
        raise APIError(422, "request_too_large",
                       f"this request asks for {work} characters of work (prompt characters x choices + characters to generate), "
                       f"more than max_request_work_chars={settings.request_work_limit}: send fewer choices or shorter prompts", None)
    if logprob_entries > settings.max_logprob_entries:
        raise APIError(422, "request_too_large",
                       f"the response would hold {logprob_entries} log-probabilities, more than max_logprob_entries="
                       f"{settings.max_logprob_entries}: ask for fewer alternatives, fewer choices or no echo", "logprobs")


def check_logit_bias(bias: dict[str, float] | None, loaded: LoadedModel) -> tuple[tuple[int, float], ...]:
    """Each key a character id of the vocabulary, written as /tokenize gives it (so "05" and "5" cannot both name
    one character); -100 means never (-inf)."""
    if not bias:
        return ()
    size, out = len(loaded.vocab), []
    for key, value in bias.items():
        char_id = int(key) if key.isascii() and key.isdigit() else -1
        if not (0 <= char_id < size and key == str(char_id)):
            raise APIError(400, "invalid_field", f"logit_bias: {key!r} is not a character id of this model (0 to {size - 1}; "
                           f"POST /tokenize gives a text's ids)", "logit_bias")
        out.append((char_id, float("-inf") if value <= -MAX_BIAS else value))
    if all(v == float("-inf") for _, v in out) and len(out) == size:
        raise APIError(400, "invalid_field", "logit_bias: every character is banned (-100): nothing could be written",
                       "logit_bias")
    return tuple(sorted(out))


def check_stops(stops: list[str] | tuple[str, ...], loaded: LoadedModel, settings: Settings) -> None:
    """Stop strings within the settings' bounds, each one able to match."""
    if len(stops) > settings.max_stop_strings:
        raise APIError(422, "invalid_field", f"stop: {len(stops)} strings is more than max_stop_strings={settings.max_stop_strings}", "stop")
    for i, s in enumerate(stops):
        if not s or len(s) > settings.max_stop_chars:
            raise APIError(422, "invalid_field", f"stop.{i}: stop strings must have 1 to {settings.max_stop_chars} characters", f"stop.{i}")
        unknown = loaded.vocab.unknown_chars(s)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown)
            raise APIError(422, "invalid_field", f"stop.{i}: {s!r} can never match: {shown} is not in the model's vocabulary", f"stop.{i}")


@functools.lru_cache(maxsize=256)
def _compiled(kind: str, source: str | tuple[str, ...] | None, chars: tuple[str, ...]) -> Constraint:
    if kind == "regex":
        return compile_regex(source, list(chars))
    if kind == "choice":
        return compile_choices(list(source), list(chars))
    return compile_json(None if source is None else json.loads(source), list(chars))


async def compile_constraint(structured: StructuredOutputs | None, loaded: LoadedModel,
                             param: str = "structured_outputs") -> Constraint | None:
    """The automaton of a regex, a choice list or a JSON schema, compiled off the event loop (and kept:
    clients repeat them)."""
    kinds = [] if structured is None else structured.kinds()
    if not kinds:
        return None
    if len(kinds) > 1:
        raise APIError(400, "invalid_field", f"structured_outputs: give one of regex, choice, json and json_object, "
                       f"not {' and '.join(kinds)}", "structured_outputs")
    kind = kinds[0]
    source = {"regex": structured.regex, "choice": tuple(structured.choice or ()), "json_object": None,
              "json": json.dumps(structured.json_schema)}[kind]  # in its order: a schema's properties come out in it
    try:
        return await asyncio.to_thread(_compiled, "json" if kind == "json_object" else kind, source, tuple(loaded.vocab.chars))
    except ConstraintError as e:
        raise APIError(400, "invalid_constraint", f"{param}.{e}", param if param != "structured_outputs" else f"{param}.{kind}") from None


async def validate(inputs: EngineInputs, loaded: LoadedModel, settings: Settings) -> Validated:
    """Every check that can fail, then one GenerationRequest per choice, choices ordered prompt by prompt."""
    check_max_new_tokens(inputs.max_tokens, settings, inputs.max_tokens_param)
    check_stops(inputs.stop, loaded, settings)
    encoded, texts, changed = [], [], 0
    for p, prompt in enumerate(inputs.prompts):
        param = inputs.prompt_param if len(inputs.prompts) == 1 else f"{inputs.prompt_param}.{p}"
        if isinstance(prompt, str):
            ids, n_changed = encode_prompt(prompt, loaded, settings, param, inputs.unknown_chars, inputs.replacement,
                                           inputs.unknown_hint)
            changed += n_changed
        else:
            ids = check_token_ids(prompt, loaded, settings, param)
            prompt = loaded.vocab.decode(ids)
        encoded.append(ids)
        texts.append(prompt)
    lengths = [len(ids) for ids in encoded]
    per_position = 1 + (inputs.sampling.get("top_logprobs") or 0)
    positions = (sum(lengths) * int(inputs.prompt_logprobs is not None) + len(lengths) * inputs.max_tokens * int(inputs.logprobs)) * inputs.n
    check_request_size(lengths, inputs.n, inputs.max_tokens, settings, logprob_entries=positions * per_position)
    constraint = await compile_constraint(inputs.structured, loaded, inputs.structured_param)
    bias = check_logit_bias(inputs.logit_bias, loaded)
    params = sampling_params(inputs.sampling)
    stop = tuple(inputs.stop) + inputs.protocol_stop
    choices = []
    for text, ids in zip(texts, encoded):
        for j in range(inputs.n):
            seed = None if inputs.seed is None else (inputs.seed + j) % (MAX_SEED + 1)
            request = GenerationRequest(prompt_ids=ids, max_new_tokens=inputs.max_tokens, params=params, seed=seed, stop=stop,
                                        logprobs=inputs.logprobs, prompt_logprobs=inputs.prompt_logprobs,
                                        stream_tokens=inputs.stream, constraint=constraint, logit_bias=bias)
            choices.append(Choice(len(choices), text, j == 0, request))
    return Validated(choices, changed)
