"""The tests' oracle: one stream sampled by a plain loop over the model, like char-rnn's sample.lua.

It shares nothing with the engine but the model and the sampling function: it draws its random numbers,
applies its controls and starts an empty prompt as the engine is meant to (the start character "\n",
the counter from 0, penalties over the prompt and the text), so a server or `charlstm sample` that
batches, slices prompts or pads rows must still give this text for a seed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import numpy as np
import torch

from service.model.network import CharLSTM
from service.sampling import MAX_SEED, SamplingParams, sample_next, uniforms
from service.model.vocab import CharVocab

START_CHAR = "\n"  # what the server feeds a fresh stream without a prompt

_DEFAULTS = SamplingParams()


def start_id(vocab: CharVocab) -> int:
    """The id fed when there is no prompt: the start character's, or 0 when the vocabulary lacks it."""
    return vocab.encode(START_CHAR)[0] if START_CHAR in vocab else 0


@torch.no_grad()
def reference_text(model: CharLSTM, vocab: CharVocab, prompt: str, length: int,
                  temperature: float = _DEFAULTS.temperature, top_k: int = _DEFAULTS.top_k,
                  top_p: float = _DEFAULTS.top_p, repetition_penalty: float = _DEFAULTS.repetition_penalty,
                  stop: tuple[str, ...] = (), seed: int | None = None) -> Iterator[str]:
    """Up to `length` characters after `prompt`; ends early at the first stop string, which is not yielded."""
    model.eval()
    seed = secrets.randbelow(MAX_SEED) if seed is None else seed
    prompt_ids = vocab.encode(prompt)
    logits, state = model(torch.tensor([prompt_ids or [start_id(vocab)]]), None)  # (1, T, V)
    last = logits[:, -1].numpy()  # (1, V) float32
    controls = (np.array([temperature], dtype=np.float32), np.array([top_k], dtype=np.int64),
                np.array([top_p], dtype=np.float32), np.array([repetition_penalty], dtype=np.float32))
    seen = None
    if repetition_penalty != 1.0:
        seen = np.zeros((1, len(vocab)), dtype=bool)  # (1, V)
        seen[0, prompt_ids] = True
    stops = tuple(s for s in stop if s)
    longest = max((len(s) for s in stops), default=0)
    text, released = "", 0  # generated so far; how much of it has been yielded
    for n in range(length):
        u = uniforms(np.array([seed]), np.array([n]))  # (1,) float64
        nxt, _ = sample_next(last, *controls, seen, u, want_logprobs=False)  # (1,) int64
        if seen is not None:
            seen[0, nxt] = True
        text += vocab.decode(nxt.tolist())
        ended = next((s for s in stops if text.endswith(s)), None)
        if ended is not None:
            if len(text) - len(ended) > released:
                yield text[released : len(text) - len(ended)]
            return
        # hold back a tail that could still grow into a stop string
        held = next((k for k in range(min(longest - 1, len(text)), 0, -1)
                     if any(s.startswith(text[-k:]) for s in stops)), 0)
        if len(text) - held > released:
            yield text[released : len(text) - held]
            released = len(text) - held
        logits, state = model(torch.from_numpy(nxt).view(1, 1), state)
        last = logits[:, -1].numpy()
    if released < len(text):
        yield text[released:]
