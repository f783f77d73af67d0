"""The states short prompts leave a fresh stream in, kept: a prompt seen before is not ingested again.

A fresh stream starts from the zero state, so the state after its prompt depends on the prompt alone, and
a row's bits do not depend on its batch: a kept state is the very state ingestion would give. llama.cpp's
server (`cache_prompt`) and vLLM's prefix caching keep a prompt's work the same way. Here the keys are whole
prompts of up to `max_chars` characters (a chat template's opening, the start character of an empty
prompt, a client's fixed prompt), the least recently used go first, and a stream that continues a state
(a session), or asks for its prompt's log-probabilities, always ingests its own.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

PROMPT_STATES = 256  # states kept (2 x 2 x 512 float32 is 8 KB each: 2 MB for the bundled model)
PROMPT_CHARS = 64  # the longest prompt kept


class PromptStates:
    def __init__(self, entries: int = PROMPT_STATES, max_chars: int = PROMPT_CHARS):
        self.entries, self.max_chars = entries, max_chars
        self._states: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self.hits = 0

    def keeps(self, stream) -> bool:
        """Whether the stream's state after its prompt is one this cache holds or takes: a fresh stream,
        its prompt short and unscored."""
        request = stream.request
        return (self.entries > 0 and request.state is None and request.prompt_logprobs is None
                and len(stream.feed) <= self.max_chars)

    def recall(self, feed: list[int]) -> np.ndarray | None:
        """The state (2, L, H) after `feed` from the zero state, a copy of its own; None if not kept."""
        state = self._states.get(key := tuple(feed))
        if state is None:
            return None
        self._states.move_to_end(key)
        self.hits += 1
        return state.copy()

    def keep(self, feed: list[int], state: np.ndarray) -> None:
        """state (2, L, H): the state after `feed` from the zero state."""
        self._states[key := tuple(feed)] = state.copy()
        self._states.move_to_end(key)
        while len(self._states) > self.entries:
            self._states.popitem(last=False)
