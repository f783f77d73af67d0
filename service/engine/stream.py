"""One request's streams in the engine, each in an explicit phase, and the request that groups them.

A stream moves WAITING -> INGESTING -> DECODING -> FINISHED (it may finish from any phase). Its phase,
not which of the engine's containers happens to hold it, says what the scheduler may do with it.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from .stops import StopMatcher
from .types import ANONYMOUS, Alternatives, Client, GenerationRequest, PromptScored


class Phase(enum.Enum):
    WAITING = "waiting"  # accepted, in its request's line for a row (or paused: its row went to another client)
    INGESTING = "ingesting"  # holds a row place; its prompt is ingested slice by slice
    DECODING = "decoding"  # a row of the batch: its prompt is in
    FINISHED = "finished"  # its Done is out and its place given back


class RequestGroup:
    """The streams of one request (an OpenAI request's choices), from one client. Together they hold at
    most the scheduler's `max_rows_per_request` rows at once, and the engine's queue bound counts them as
    one request."""

    __slots__ = ("size", "rows", "left", "client")

    def __init__(self, size: int, client: Client = ANONYMOUS):
        self.size, self.client = size, client
        self.rows = 0  # streams of this request that hold a row place (INGESTING or DECODING)
        self.left = size  # streams not yet finished


class Stream:
    """One stream of choices in flight: its random stream, its text so far, its listener."""

    def __init__(self, request: GenerationRequest, listener: Any, seed: int, feed: list[int], now: float,
                 group: RequestGroup, seq: int):
        self.request, self.listener, self.seed = request, listener, seed
        self.group, self.seq = group, seq  # seq: arrival order, the scheduler's tie-break
        self.phase = Phase.WAITING
        self.state: np.ndarray | None = request.state  # (2, L, H): the caller's (None: zeros), then on the backend's device while the prompt is ingested; then the batch holds it
        self.feed, self.fed = feed, 0  # characters to ingest before generating, and how many are done
        self.matcher = StopMatcher(request.stop) if request.stop else None
        self.chars: list[str] = []  # the text so far, a character each (a constraint may write some for the model)
        self.steps = 0  # characters the model drew and consumed (completion tokens, and the seed's draws)
        self.lps: list[float] = []
        self.tops: list[Alternatives] = []  # alternatives at each generated character, when asked for
        self.prompt_lps: list[float | None] = []  # the prompt's log-probabilities, when asked for
        self.prompt_tops: list[Alternatives | None] = []
        self.prompt_scored: PromptScored | None = None
        self.released = 0  # characters already sent to the listener
        self.paused: Any = None  # a one-row Batch while the stream waits again, paused for a fairer client (fairness.py)
        self.t_submit, self.t_last = now, 0.0

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def prompt_left(self) -> int:
        return len(self.feed) - self.fed

    def end(self) -> bool:
        """Move to FINISHED, giving back the row place it held. False when it had already finished."""
        if self.phase is Phase.FINISHED:
            return False
        if self.phase in (Phase.INGESTING, Phase.DECODING):
            self.group.rows -= 1
        self.phase = Phase.FINISHED
        return True
