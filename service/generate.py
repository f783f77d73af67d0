"""Single-stream generation for the command line, like char-rnn's sample.lua.

The sampler holds the state and passes it in; the prompt primes that same state in one call.
It draws its random numbers exactly as the serving engine does, so a seed means the same text here.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import numpy as np
import torch

from .model import CharLSTM
from .sampling import MAX_SEED, sample_next, uniforms
from .vocab import CharVocab


@torch.no_grad()
def generate_text(model: CharLSTM, vocab: CharVocab, prompt: str, length: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    model.eval()
    seed = secrets.randbelow(MAX_SEED) if seed is None else seed
    ids = vocab.encode(prompt) if prompt else [0]  # no prompt: start from the first vocabulary character
    logits, state = model(torch.tensor([ids]), None)  # (1, T, V)
    last = logits[:, -1]  # (1, V)
    controls = (torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([1.0]))
    for n in range(length):
        u = torch.from_numpy(uniforms(np.array([seed]), np.array([n])))
        nxt, _ = sample_next(last, *controls, None, u)  # (1,)
        yield vocab.decode(nxt.tolist())
        logits, state = model(nxt.view(1, 1), state)
        last = logits[:, -1]
