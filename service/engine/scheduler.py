"""What runs each loop: which waiting streams get a row, and which prompt slices are ingested.

**Admission.** Waiting streams stand in their request's own line, and each client's lines in arrival
order. A free row goes to the client that has received the least service, by its weight (the Virtual
Token Counter, `fairness.py`), and within that client the lines are served round robin, one stream of
each line a pass. One request holds at most `max_rows_per_request` row places at once (ingesting or
decoding), so a request with many choices never takes every row: its other choices wait in its own
line, behind nobody else's. When no row is free and a waiting client holds less than its share of the
rows while another holds more, a row of the other is paused for it (`to_pause`): its stream keeps its
state, text and random stream and waits again at the head of its line. A paused stream resumes as if
it had never stopped: its numbers never depended on the batch around it.

**Ingestion.** Every stream that still has prompt left is ingested in blocks: each loop runs one
block of at most `prefill_rows` rows, each row the next slice of one stream's prompt, all in one backend
call (`Backend.ingest`: layer by layer, with the input projections batched over the slice where the
arithmetic stays exact). A slice ends at the next multiple of `prefill_chunk` from its stream's own
start, so a prompt is cut the same way alone or under load, and a row's numbers are the step's, never
its neighbours' (the backend contract pins it): a prompt gets the same state alone, in a full block and
under decode load. A short prompt is all one slice: it is in by the end of the loop it was admitted in.

Which streams get the rows: *shortest remaining first, with ageing in its plainest form*. The stream
that arrived first among those ingesting always gets a row, the others go fewest characters left first.
Shortest first puts a 20-character prompt ahead of 8 prompts of 20,000 (round robin would make it wait
behind each); the oldest stream's row means no prompt is ever starved, however many short ones keep
arriving: a stream waits at most until those that arrived before it are in. (An earliest-deadline
order was tried first: long prompts' deadlines fell ahead of every short prompt that arrived after
them, and the short requests' first character took 2.1 s at p50.)

**The bound on a decode step's delay.** Decoding rows step once every loop; between two of their steps
a loop ingests one block: at most `prefill_rows` slices of `prefill_chunk` characters, whose time is
the backend's for `prefill_chunk` steps of `prefill_rows` rows (benchmarks/bench_prefill.py measures
it; benchmarks/README.md gives it). A block of fewer rows may give each row several chunks, as many as
the backend's own estimate (`Backend.block_seconds`, from what it measured when it was built) puts
within that same time: a row of a small block costs more per character than a row of a full one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .fairness import ServiceCounters
from .stream import Phase, RequestGroup, Stream
from .types import Client

MAX_PAUSES = 4  # rows a loop pauses at most for fairer clients: a burst of arrivals is served over a few loops
Block = list[tuple[Stream, int]]  # one loop's ingestion: (stream, end) a row, ingest stream.feed[stream.fed:end]


class Scheduler:
    """The waiting lines and the ingesting streams; the engine's loop asks it, each loop, what to run."""

    def __init__(self, max_rows: int, max_rows_per_request: int, prefill_chunk: int, prefill_rows: int = 8,
                 block_seconds: Callable[[int, int], float | None] | None = None, prompt_cost: float = 0.5):
        """prefill_rows: the rows of a loop's block; prefill_chunk: a row's slice. block_seconds(rows,
        chars): the backend's estimate of a block's time (`Backend.block_seconds`), by which a block of
        fewer rows may take slices of several chunks within a full block's time. prompt_cost: what a
        prompt character counts against its client's service, in generated characters (`fairness.py`)."""
        if not 1 <= max_rows_per_request:
            raise ValueError(f"max_rows_per_request must be at least 1, got {max_rows_per_request}")
        if not (1 <= prefill_rows and 1 <= prefill_chunk):
            raise ValueError(f"prefill_rows and prefill_chunk must be at least 1, got {prefill_rows} and {prefill_chunk}")
        self.max_rows, self.max_rows_per_request = max_rows, max_rows_per_request
        self.chunk, self.block_rows = prefill_chunk, prefill_rows
        self.block_seconds = block_seconds or (lambda rows, chars: None)
        self._chunks: dict[int, int] = {}  # rows -> chunks_a_row(rows): the backend's estimate is fixed once it is built
        self.fairness = ServiceCounters(prompt_cost)
        self._clients: dict[str, Client] = {}  # clients with streams waiting, by id
        self._lines: dict[str, dict[RequestGroup, deque[Stream]]] = {}  # per client: its requests' lines, next first
        self._waiting = 0
        self.ingesting: list[Stream] = []

    # ------------------------------------------------------------------ waiting
    def enqueue(self, streams: list[Stream]) -> None:
        for stream in streams:
            client = stream.group.client
            lines = self._lines.get(client.id)
            if lines is None:  # the client becomes backlogged: lifted to the least served of those waiting
                self.fairness.lift(client, list(self._clients.values()))
                lines = self._lines[client.id] = {}
                self._clients[client.id] = client
            lines.setdefault(stream.group, deque()).append(stream)
        self._waiting += len(streams)

    @property
    def waiting(self) -> int:
        return self._waiting

    def requeue(self, streams: list[Stream]) -> None:
        """Paused streams wait again, each at the head of its request's line (it came before the rest)."""
        for stream in streams:
            client = stream.group.client
            if client.id not in self._lines:
                self._lines[client.id], self._clients[client.id] = {}, client
            lines = self._lines[client.id]
            line = lines.pop(stream.group, deque())
            line.appendleft(stream)
            self._lines[client.id] = {stream.group: line, **lines}
        self._waiting += len(streams)

    def to_pause(self, decoding: list[Stream], limit: int = MAX_PAUSES) -> list[int]:
        """Rows of the batch to pause so that a waiting client gets rows it is owed (`fairness.py`): only
        when no row is free, only from a client holding more than its share of the rows, only for a
        waiting client holding less than its share and less served (by its counter) than the other.
        Returns row indices of `decoding` (the batch's streams), the most characters left first."""
        if not self._lines or self.max_rows - len(decoding) - len(self.ingesting) > 0:
            return []
        held: dict[str, int] = {}
        clients: dict[str, Client] = dict(self._clients)
        for stream in [*decoding, *self.ingesting]:
            client = stream.group.client
            held[client.id] = held.get(client.id, 0) + 1
            clients[client.id] = client
        total = sum(c.weight for c in clients.values())
        share = {cid: self.max_rows * c.weight / total for cid, c in clients.items()}
        counters, paused = self.fairness, []
        rows_of: dict[str, list[int]] = {}
        for row, stream in enumerate(decoding):
            rows_of.setdefault(stream.group.client.id, []).append(row)
        while len(paused) < limit:
            owed = [cid for cid in self._lines if held.get(cid, 0) + 1 <= share[cid]
                    and any(g.rows < self.max_rows_per_request for g in self._lines[cid])]
            over = [cid for cid in rows_of if held[cid] - 1 >= share[cid] and rows_of[cid]]
            if not owed or not over:
                break
            taker = min(owed, key=lambda cid: counters.of(clients[cid]))
            giver = max(over, key=lambda cid: counters.of(clients[cid]))
            if counters.of(clients[taker]) >= counters.of(clients[giver]):
                break
            rows = rows_of[giver]
            row = max(rows, key=lambda r: decoding[r].request.max_new_tokens - len(decoding[r].chars))
            rows.remove(row)
            paused.append(row)
            held[giver] -= 1
            held[taker] = held.get(taker, 0) + 1
        return paused

    def waiting_streams(self) -> list[Stream]:
        return [s for lines in self._lines.values() for line in lines.values() for s in line]

    def admit(self, decoding: int) -> list[Stream]:
        """Waiting streams that get a row place now (they become INGESTING): each free row to the client
        with the smallest service counter among those with a stream that may take one (`fairness.py`),
        and within that client round robin over its requests' lines, none beyond its request's cap.
        `decoding`: the rows of the batch."""
        free = self.max_rows - decoding - len(self.ingesting)
        admitted: list[Stream] = []
        counters = self.fairness
        while free > 0 and self._lines:
            best, best_line = None, None
            for cid in reversed(self._lines):  # on a tie, the client backlogged last: it was lifted to the others
                lines = self._lines[cid]
                if best is not None and counters.of(self._clients[cid]) >= counters.of(self._clients[best]):
                    continue
                group = next((g for g in lines if g.rows < self.max_rows_per_request), None)
                if group is not None:
                    best, best_line = cid, group
            if best is None:
                break  # every waiting stream's request holds its cap of rows
            lines = self._lines[best]
            line = lines.pop(best_line)
            stream = line.popleft()
            if line:
                lines[best_line] = line  # to the back of its client's lines: round robin
            elif not lines:
                del self._lines[best], self._clients[best]
            stream.phase = Phase.INGESTING
            best_line.rows += 1
            admitted.append(stream)
            free -= 1
        self._waiting -= len(admitted)
        self.ingesting.extend(admitted)
        return admitted

    # ------------------------------------------------------------------ ingesting
    def plan(self) -> Block:
        """This loop's block: the oldest ingesting stream's next slice, then the shortest remaining first."""
        if not self.ingesting:
            return []
        oldest = min(self.ingesting, key=lambda s: s.seq)
        rest = sorted((s for s in self.ingesting if s is not oldest), key=lambda s: (s.prompt_left, s.seq))
        streams = [oldest, *rest][: self.block_rows]
        chunks = self.chunks_a_row(len(streams))
        chunk = self.chunk
        return [(stream, min((stream.fed // chunk + chunks) * chunk, len(stream.feed))) for stream in streams]

    def chunks_a_row(self, rows: int) -> int:
        """How many chunks each row of a block of `rows` rows takes: 1, or as many (up to prefill_rows) as
        keep the block within the time of a full one (prefill_rows x prefill_chunk), where the backend
        can tell. A row of a small block costs more per character than one of a full block (the weights
        are read once a step for every row), so a lone prompt goes in faster this way, and a decode step
        still waits no longer than behind a full block."""
        if rows in self._chunks:
            return self._chunks[rows]
        full = self.block_seconds(self.block_rows, self.chunk)
        chunks = 1
        while chunks < self.block_rows and full is not None:
            longer = self.block_seconds(rows, (chunks + 1) * self.chunk)
            if longer is None or longer > full:
                break
            chunks += 1
        self._chunks[rows] = chunks
        return chunks

    def ingested(self, stream: Stream) -> None:
        """Its whole prompt is in: it leaves the ingesting streams (to the batch, or finished)."""
        self.ingesting.remove(stream)
        if not stream.finished:
            stream.phase = Phase.DECODING

    # ------------------------------------------------------------------ leaving
    def forget_finished(self) -> None:
        """Finished streams (cancelled, shut down) leave the lines and the ingesting streams."""
        self.ingesting = [s for s in self.ingesting if not s.finished]
        for cid in list(self._lines):
            lines = self._lines[cid]
            for group in list(lines):
                line = deque(s for s in lines[group] if not s.finished)
                self._waiting -= len(lines[group]) - len(line)
                if line:
                    lines[group] = line
                else:
                    del lines[group]
            if not lines:
                del self._lines[cid], self._clients[cid]

    def clear(self) -> list[Stream]:
        """Every stream it holds, which it forgets (the loop is over, or a fault ended them)."""
        streams = [*self.ingesting, *self.waiting_streams()]
        self.ingesting, self._lines, self._clients, self._waiting = [], {}, {}, 0
        return streams
