"""What runs each loop: which waiting streams get a row, and which prompt slices are ingested.

**Admission.** Waiting streams stand in their request's own line, and the lines are served round robin
in arrival order, one stream of each line a pass, while rows are free. One request holds at most
`max_rows_per_request` row places at once (ingesting or decoding), so a request with many choices
never takes every row: its other choices wait in its own line, behind nobody else's.

**Ingestion.** Every stream that still has prompt left shares one budget of `prefill_budget` prompt
characters a loop (vLLM's chunked prefill with one token budget). The order is *shortest remaining
first, with ageing in its plainest form*: the stream that arrived first among those ingesting gets one
slice every loop, and the rest of the budget goes to the others, fewest characters left first. Shortest
first puts a 20-character prompt ahead of 8 prompts of 20,000 at once (round robin would make it wait
its turn behind each of them, a full slice each); the oldest stream's slice means no prompt is ever
starved, however many short ones keep arriving: a stream waits at most until those that arrived before
it are in. (An earliest-deadline order, each loop waited counting as one slice less, was tried first:
long prompts' deadlines then fell ahead of every short prompt that arrived after them, and under
bench_mixed the short requests' first character took 2.1 s at p50.) A prompt's short tail (at most
`SHORT_PROMPT` characters, the whole of a short prompt) costs no budget: the batch's own steps feed it.

**The bound on a decode step's delay.** Decoding rows step once every loop; between two of their steps
a loop ingests at most `prefill_budget` prompt characters (a slice never crosses a multiple of
`prefill_chunk`, which is at most the budget, and each slice costs at least `MIN_SLICE_COST` of it). So
one decode step waits at most the time it takes to ingest `prefill_budget` characters, in slices
(benchmarks/README.md gives it).

**Why slices are not batched across streams.** A slice always ends at a multiple of `prefill_chunk`
from its stream's own start, so the same prompt is cut the same way alone or under load. Ingesting
slices of several streams in one LSTM call would be faster under load (1.7x the characters per second
for 8 slices of 512, benchmarks/bench_ingest.py), but one row rounds differently from two or more, so a
slice would get other bits alone than beside others; padding a lone slice to two rows keeps the bits but
makes a lone prompt's ingestion about twice as slow. We keep one stream a call.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..backends.base import SHORT_PROMPT
from .stream import Phase, RequestGroup, Stream

MIN_SLICE_COST = 32  # budget characters a slice costs at least: an LSTM call has a fixed cost too


@dataclass
class Plan:
    """One loop's ingestion: slices to run, in order, and streams whose prompt tail the batch feeds."""

    slices: list[tuple[Stream, int]]  # (stream, end): ingest stream.feed[stream.fed:end]; end == fed: nothing left
    tails: list[Stream]  # join the batch now; the batch's steps feed what is left of their prompt


class Scheduler:
    """The waiting lines and the ingesting streams; the engine's loop asks it, each loop, what to run."""

    def __init__(self, max_rows: int, max_rows_per_request: int, prefill_chunk: int, prefill_budget: int | None = None,
                 feed_tails_in_batch: bool = True):
        """prefill_budget: prompt characters a loop (at least one chunk; None: two chunks)."""
        if not 1 <= max_rows_per_request:
            raise ValueError(f"max_rows_per_request must be at least 1, got {max_rows_per_request}")
        self.max_rows, self.max_rows_per_request = max_rows, max_rows_per_request
        self.chunk = prefill_chunk
        self.budget = max(prefill_chunk, prefill_budget or 2 * prefill_chunk)
        self.feed_tails_in_batch = feed_tails_in_batch  # off with a device step (it feeds no tails)
        self._lines: dict[RequestGroup, deque[Stream]] = {}  # waiting streams, per request, requests in arrival order
        self.ingesting: list[Stream] = []

    # ------------------------------------------------------------------ waiting
    def enqueue(self, streams: list[Stream]) -> None:
        for stream in streams:
            self._lines.setdefault(stream.group, deque()).append(stream)

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def waiting_streams(self) -> list[Stream]:
        return [s for line in self._lines.values() for s in line]

    def admit(self, decoding: int) -> list[Stream]:
        """Waiting streams that get a row place now (they become INGESTING), round robin over the requests'
        lines, none beyond its request's cap. `decoding`: the rows of the batch."""
        free = self.max_rows - decoding - len(self.ingesting)
        admitted: list[Stream] = []
        while free > 0 and self._lines:
            took = False
            for group in list(self._lines):
                if free == 0:
                    break
                if group.rows >= self.max_rows_per_request:
                    continue
                line = self._lines[group]
                stream = line.popleft()
                if not line:
                    del self._lines[group]
                stream.phase = Phase.INGESTING
                group.rows += 1
                admitted.append(stream)
                free -= 1
                took = True
            if not took:
                break
        self.ingesting.extend(admitted)
        return admitted

    # ------------------------------------------------------------------ ingesting
    def plan(self) -> Plan:
        """This loop's slices within the shared budget: the oldest stream's first, then shortest remaining first."""
        chunk, budget = self.chunk, self.budget
        slices: list[tuple[Stream, int]] = []
        tails = [s for s in self.ingesting if self._feeds_in_batch(s)]
        taken = {id(s) for s in tails}
        rest = [s for s in self.ingesting if id(s) not in taken]
        if rest:
            oldest = min(rest, key=lambda s: s.seq)
            rest.remove(oldest)
            for stream in [oldest, *sorted(rest, key=lambda s: (s.prompt_left, s.seq))]:
                end = min((stream.fed // chunk + 1) * chunk, len(stream.feed))
                cost = max(end - stream.fed, MIN_SLICE_COST) if end > stream.fed else 0
                if cost > budget and slices:
                    continue  # the slice waits for a later loop: where it is cut does not change
                budget -= cost
                slices.append((stream, end))
        self.ingesting = [s for s in self.ingesting if id(s) not in taken]
        for stream in tails:
            stream.phase = Phase.DECODING
        return Plan(slices=slices, tails=tails)

    def ingested(self, stream: Stream) -> None:
        """Its whole prompt is in: it leaves the ingesting streams (to the batch, or finished)."""
        self.ingesting.remove(stream)
        if not stream.finished:
            stream.phase = Phase.DECODING

    def _feeds_in_batch(self, stream: Stream) -> bool:
        """A prompt's short tail is fed by the batch's own steps: on its own it would take up to SHORT_PROMPT
        steps of one row while every other row waits; in the batch each character costs a row of a step
        it takes anyway, and the row's state comes out bit for bit the same (backends/base.py).
        Not where the prompt is scored, or only its state is wanted."""
        tail = stream.prompt_left
        return (self.feed_tails_in_batch and 0 < tail <= SHORT_PROMPT and stream.request.prompt_logprobs is None
                and stream.request.max_new_tokens > 0)

    # ------------------------------------------------------------------ leaving
    def forget_finished(self) -> None:
        """Finished streams (cancelled, shut down) leave the lines and the ingesting streams."""
        self.ingesting = [s for s in self.ingesting if not s.finished]
        for group in list(self._lines):
            line = deque(s for s in self._lines[group] if not s.finished)
            if line:
                self._lines[group] = line
            else:
                del self._lines[group]

    def clear(self) -> list[Stream]:
        """Every stream it holds, which it forgets (the loop is over, or a fault ended them)."""
        streams = [*self.ingesting, *self.waiting_streams()]
        self.ingesting, self._lines = [], {}
        return streams
