"""The engine loop: continuous batching of every running stream, a look of k steps at a time.

One thread owns the model and the `Batch`. Callers `submit` requests and `cancel` them from any
thread. Each loop iteration reads as vLLM's `EngineCore.step` does: **schedule** (the `Scheduler`
admits waiting streams and picks the prompt slices ingested within one shared budget), **step** (the
`Stepper` takes a look of k steps of every decoding row) and **process outputs** (`Output` turns the
look's ids into each stream's text, stop strings and end); then the loop hands that loop's events to
`deliver` at once.

The engine knows nothing of sessions, stores or HTTP: a request brings the state it starts from and
a completed stream hands back the state it ended in. Every stream that was accepted gets exactly one
`Done`, whatever fails on the way, and gives its place back when it does.

With a backend that holds the rows on its own device (its `decoder`: the CUDA backend) the rows'
states, controls and sampling live there, and a look's k steps run there before the host sees their
ids, in one copy. Either way rows are admitted, cancelled and finished between looks, so each of those
waits at most one look. A row that ends inside a look (its length, a stop string) ignores the steps it
took beyond its end and hands back the state after its last character, which is kept for every step of
the look.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..sampling import MAX_SEED, log_softmax, top_alternatives
from ..model.vocab import CharVocab
from .batch import Batch
from .output import Output
from .prompt_cache import PromptStates
from ..backends.base import Backend
from .observers import Fanout
from .scheduler import Scheduler
from .share import ComputeShare
from .step import QUIET_STEPS, Stepper
from .stream import Phase, RequestGroup, Stream
from .fairness import queue_share
from .types import ANONYMOUS, Client, EngineUnavailable, GenerationRequest, Overloaded, PromptScored, ShuttingDown, Unsupported

__all__ = ["Engine", "EngineConfig", "EngineSnapshot", "EngineStats", "Stream"]

log = logging.getLogger("charlstm.engine")

MAX_DELIVERY_ATTEMPTS = 100  # loops a listener's events are retried before it is given up
RETRY_DELIVERY_S = 0.01  # an idle loop's wait before retrying undelivered events


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings and their defaults: the server's settings of the same names take theirs from here
    (service/settings.py)."""

    max_batch_size: int = 64  # rows stepped together
    max_queue: int = 256  # requests waiting for a row, beyond the rows' own; beyond this, submissions are refused (a client within its share of the bound is still let in: fairness.py)
    prompt_cost: float = 0.5  # a prompt character's weight in its client's service counter, in generated characters
    prefill_chunk: int = 128  # a prompt is cut at multiples of this, from its own start: the longest slice of a block's row
    prefill_rows: int = 8  # a loop ingests one block of at most this many streams' slices, in one backend call
    start_char: str = "\n"  # fed when a fresh stream has no prompt, so the first character has context
    decode_steps: int = 1  # steps a look: the rows' text is updated once per look (a device step must be built for as many)
    quiet_steps: int = QUIET_STEPS  # steps of a look on the host while nobody waits (cut short when someone comes); 1: none
    max_rows_per_request: int | None = None  # rows one request holds at once; None: a quarter of max_batch_size (at least 1)
    # How often characters are handed to the listeners: a stream's first characters, its end and anything
    # but characters go at once; later characters wait for the next hand-over, at most this long. 0: every
    # loop. Each hand-over wakes the listeners' side (the event loop), which costs more than a step of a
    # small batch, while a reader that writes every `stream_interval_ms` gains nothing from more.
    deliver_interval_s: float = 0.0

    @property
    def rows_per_request(self) -> int:
        if self.max_rows_per_request is not None:
            return self.max_rows_per_request
        return max(1, self.max_batch_size // 4)


class EngineStats(Protocol):
    """The numbers the engine reports. The metrics module implements this; the engine never sees Prometheus."""

    def on_step(self, batch_size: int, seconds: float, steps: int = 1) -> None: ...  # one look of `steps` steps
    def on_prefill(self, chars: int, seconds: float) -> None: ...
    def on_queue_time(self, seconds: float) -> None: ...
    def on_client_queue_time(self, client: str, seconds: float) -> None: ...  # client: its label (Client.label)
    def on_client_served(self, served: dict[str, int]) -> None: ...  # label -> characters generated in one look
    def on_client_refused(self, client: str, reason: str) -> None: ...
    def on_paused(self, rows: int) -> None: ...  # rows paused for a fairer client
    def on_first_token(self, seconds: float) -> None: ...
    def on_inter_token(self, gaps: list[float], counts: list[int]) -> None: ...  # gaps[i] seen counts[i] times
    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...
    def on_rejected(self, reason: str) -> None: ...
    # reported by the session layer through a Fanout of its own (the services' `events`, service/server.py)
    def on_session_created(self) -> None: ...
    def on_session_removed(self, reason: str) -> None: ...
    def on_session_store_call(self, operation: str, seconds: float, failed: bool) -> None: ...
    def on_session_snapshot_failed(self, operation: str) -> None: ...  # "load" or "write"
    def on_session_not_durable(self, changes: int) -> None: ...  # acknowledged changes the session file could not take


@dataclass(frozen=True)
class EngineSnapshot:
    running: int  # in the batch or ingesting a prompt
    waiting: int  # accepted, waiting for a row
    steps: int
    ready: bool
    draining: bool
    failed: bool  # the engine thread died of an internal error: every request gets 503 until a restart


class Engine:
    def __init__(self, backend: Backend, vocab: CharVocab, config: EngineConfig = EngineConfig(),
                 deliver: Callable[[list[tuple[Any, list]]], None] | None = None, share: ComputeShare | None = None):
        """A backend with a `decoder` keeps the batch's rows on its device and steps them there (its capacity
        bounds max_batch_size); the engine then only has it ingest prompts. share: the turns this engine
        takes on the cores with the engines of other models (service/engine/share.py); None: the cores are its own."""
        decoder = backend.decoder
        if decoder is not None and decoder.capacity < config.max_batch_size:
            raise ValueError(f"the device batch holds {decoder.capacity} rows, fewer than max_batch_size={config.max_batch_size}")
        if decoder is not None and decoder.max_steps != config.decode_steps:
            raise ValueError(f"the device step runs {decoder.max_steps} steps a look, decode_steps={config.decode_steps}")
        self.backend, self.vocab, self.config = backend, vocab, config
        self.decoder = decoder
        self.share = share
        # with a decoder the host Batch keeps rows and controls only; the state lives on the device
        self._no_state = np.zeros((2, backend.num_layers, 0), dtype=np.float32)
        self.deliver = deliver or _deliver_directly
        self.observers: list[EngineStats] = []
        self.events: EngineStats = Fanout(EngineStats, self.observers)  # type: ignore[assignment]: each observer's method
        self._cv = threading.Condition()
        # shared with callers, under _cv
        self._incoming: list[Stream] = []
        self._cancelled: list[Stream] = []
        self._admitted = 0  # streams accepted and not yet finished
        self._requests = 0  # requests with a stream not yet finished: what the queue bound counts
        self._clients_in: dict[str, list] = {}  # client id -> [its requests counted in _requests, its weight]
        self._seq = 0
        self._counts = (0, 0)  # (running, waiting) as of the end of the last loop
        self._draining = False
        self._deadline = float("inf")
        self._stop = False
        self._dead = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        # owned by the loop thread
        self.scheduler = Scheduler(config.max_batch_size, config.rows_per_request, config.prefill_chunk, config.prefill_rows,
                                   backend.block_seconds, config.prompt_cost)
        self.stepper = Stepper(backend, config.decode_steps, config.quiet_steps)
        self._chars = vocab.chars
        self.output = Output(self._chars, self.events, self._release)
        self._batch = self._empty_batch()
        self._joining: list[Batch] = []  # rows whose prompt is in, joining the batch this loop
        self.prompt_states = PromptStates()  # the states short prompts leave a fresh stream in (host batches)
        self._undelivered: list[tuple[Any, list, int]] = []  # (listener, events, attempts) that failed to go out
        self._next_delivery = 0.0  # perf_counter time from which characters that can wait go out
        start = config.start_char if config.start_char in vocab else vocab.chars[0]
        self._start_id = vocab.encode(start)[0]

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="charlstm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop (streams still in flight end with "shutdown") and join it. Blocks: call it off the event loop."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.share is not None:
            self.share.forget(id(self))
        self.backend.close()

    def begin_shutdown(self, grace_s: float) -> None:
        """Admit nothing new; running streams finish, or end with finish_reason 'shutdown' after the grace."""
        with self._cv:
            self._draining = True
            self._deadline = min(self._deadline, time.monotonic() + grace_s)
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cv:
            while self._admitted > 0:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def idle(self) -> bool:
        """No stream accepted and not yet ended: nothing would be cut off if the engine stopped now."""
        with self._cv:
            return self._admitted == 0

    def snapshot(self) -> EngineSnapshot:
        with self._cv:
            alive = self._thread is not None and self._thread.is_alive() and not self._stop and not self._dead
            running, waiting = self._counts
            return EngineSnapshot(running=running, waiting=waiting + len(self._incoming), steps=self._steps,
                                  ready=alive and not self._draining, draining=self._draining, failed=self._dead)

    def submit(self, request: GenerationRequest, listener: Any, client: Client = ANONYMOUS) -> Stream:
        """Queue a request; its events go to `listener`. Raises Overloaded, ShuttingDown or EngineUnavailable at once."""
        return self.submit_all([(request, listener)], client)[0]

    def submit_all(self, requests: list[tuple[GenerationRequest, Any]], client: Client = ANONYMOUS) -> list[Stream]:
        """Queue the streams of one request (an OpenAI request's choices) from `client`, all or none: they
        count as one request in the queue bound, and hold at most `max_rows_per_request` rows at once."""
        if not requests:
            raise ValueError("a request has at least one stream")
        group = RequestGroup(len(requests), client)
        with self._cv:
            if self._dead:
                self.events.on_rejected("engine_error")
                raise EngineUnavailable("the engine has stopped after an internal error; the server must be restarted")
            if self._draining or self._stop:
                self.events.on_rejected("shutting_down")
                raise ShuttingDown("the server is shutting down and admits no new work")
            if self.decoder is not None and any(r.constraint is not None for r, _ in requests):
                # the automaton must see each character before the next is drawn; a device look draws k at once
                raise Unsupported("constrained output runs on the CPU backends; this server steps on a GPU with CUDA graphs")
            self._check_queue(client)
            now, streams = time.perf_counter(), []
            for request, listener in requests:
                seed = secrets.randbelow(MAX_SEED) if request.seed is None else request.seed
                feed = list(request.prompt_ids)
                if request.fresh and not feed:
                    feed = [self._start_id]
                self._seq += 1
                streams.append(Stream(request, listener, seed, feed, now, group, self._seq))
            self._admitted += len(streams)
            self._requests += 1
            self._clients_in.setdefault(client.id, [0, client.weight])[0] += 1
            self._incoming.extend(streams)
            self._cv.notify_all()
        return streams

    def _check_queue(self, client: Client) -> None:
        """Raise Overloaded when `client` may not queue another request (under _cv): beyond its own
        `max_requests`; or the bound on requests running or waiting is reached and the client holds its
        share of it already, or is the only one in the engine (`fairness.py`). Within its share a client
        is let in past the bound, up to twice the bound."""
        held = self._clients_in.get(client.id, (0, 0))[0]
        if client.max_requests is not None and held >= client.max_requests:
            self._refuse(client, "client_limit", f"this client has {held} requests running or waiting, its limit")
        limit = self.config.max_batch_size + self.config.max_queue
        if self._requests < limit:
            return
        what = (f"{self._requests} requests are running or waiting (max_batch_size {self.config.max_batch_size} + "
                f"max_queue {self.config.max_queue}; a request counts once, whatever its choices)")
        others = {cid: w for cid, (n, w) in self._clients_in.items() if n and cid != client.id}
        if not others or self._requests >= 2 * limit:
            self._refuse(client, "overloaded", what)
        share = queue_share(limit, client, others)
        if held >= share:
            self._refuse(client, "over_share", f"{what}; this client holds {held}, its share is {share:.0f} while "
                         f"{len(others)} other client(s) wait")

    def _refuse(self, client: Client, reason: str, message: str) -> None:
        self.events.on_rejected("overloaded")
        self.events.on_client_refused(client.label, reason)
        raise Overloaded(message)

    def cancel(self, stream: Stream) -> None:
        """The client went away: the stream leaves the queue or the batch within one loop."""
        with self._cv:
            if not stream.finished:
                self._cancelled.append(stream)
                self._cv.notify_all()

    def add_observer(self, observer: EngineStats) -> None:
        self.observers.append(observer)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.critical("the engine thread failed; every request now gets 503", exc_info=True)
            with self._cv:
                self._dead = True
                self._cv.notify_all()
        finally:
            self._end_everything("error" if self._dead else "shutdown")

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._cv:
                while not (self._incoming or self._cancelled or len(self._batch) or scheduler.ingesting
                           or scheduler.waiting or self._stop):
                    if not self._cv.wait(self._idle_wait()):
                        break  # events wait for another try, or for their hand-over
                if self._stop:
                    return
                incoming, self._incoming = self._incoming, []
                cancelled, self._cancelled = self._cancelled, []
                past_deadline = self._draining and time.monotonic() >= self._deadline
            try:
                scheduler.enqueue(incoming)
                self._leave(cancelled, "cancelled")
                if past_deadline:
                    self._leave([*self._batch.rows, *scheduler.ingesting, *scheduler.waiting_streams()], "shutdown")
                self._pause_for_fairness()
                self._admit(scheduler.admit(len(self._batch)))  # schedule
                self._take_turn()  # the cores, shared with other models' engines (ComputeShare)
                t_turn = time.perf_counter()
                try:
                    joined = self._ingest()
                    if len(self._batch):
                        t0 = time.perf_counter()
                        # a glance, a hint; rows that just joined take one step, so their first characters go out at once
                        quiet = not (joined or scheduler.waiting or scheduler.ingesting or self._someone_came())
                        k, look = self.stepper.look(self._batch, quiet, self._someone_came)  # step
                        self.output.process(self._batch.rows, k, look)  # process outputs
                        self._count_service()
                        self._steps += k
                        self.events.on_step(len(self._batch), time.perf_counter() - t0, k)
                finally:
                    self._give_turn_back(time.perf_counter() - t_turn)
                self._drop_finished()
            except Exception as e:  # a fault must not take the server down: end the streams it touched, keep serving
                log.exception("engine step failed; ending the streams in the batch")
                self._fail_in_flight(e)
            self._publish_counts()
            self._flush()

    def _someone_came(self) -> bool:
        """Whether a request, a cancellation or a stop came since the loop looked: a quiet look ends then.
        Read without the lock: a hint, checked again under it at the loop's top."""
        return bool(self._incoming or self._cancelled or self._stop)

    def _count_service(self) -> None:
        """The characters each client got in this look: its service counter, and the metrics by label."""
        served, self.output.served = self.output.served, {}
        by_label: dict[str, int] = {}
        for client, n in served.values():
            self.scheduler.fairness.served(client, generated=n)
            by_label[client.label] = by_label.get(client.label, 0) + n
        if by_label:
            self.events.on_client_served(by_label)

    def _idle_wait(self) -> float | None:
        """How long an idle loop may sleep: until undelivered events are retried, or held characters are due."""
        if self._undelivered:
            return RETRY_DELIVERY_S
        if self.output.outbox:
            return max(0.0, self._next_delivery - time.perf_counter())
        return None

    def _take_turn(self) -> None:
        if self.share is not None:
            self.share.take(id(self))

    def _give_turn_back(self, seconds: float) -> None:
        if self.share is not None:
            self.share.give_back(id(self), seconds)

    def _release(self, stream: Stream) -> None:
        """A stream finished (Output.finish): its place in the engine's accounting goes back."""
        with self._cv:
            self._admitted -= 1
            group = stream.group
            group.left -= 1
            if group.left == 0:
                self._requests -= 1
                held = self._clients_in[group.client.id]
                held[0] -= 1
                if not held[0]:
                    del self._clients_in[group.client.id]
            self._cv.notify_all()

    def _leave(self, streams: list[Stream], reason: str) -> None:
        """End streams wherever they are; the scheduler forgets them now, the batch at the end of this loop."""
        if not streams:
            return
        for stream in streams:
            self.output.finish(stream, reason)
        self.scheduler.forget_finished()
        self._drop_finished()

    def _pause_for_fairness(self) -> None:
        """Rows the scheduler takes from a client over its share for a waiting one under it: each paused
        stream keeps its row of the batch, all of it (state, random stream, penalties, automaton), aside."""
        if self.decoder is not None:  # the device batch holds the rows' state: nothing is paused there
            return
        rows = self.scheduler.to_pause(self._batch.rows)
        if not rows:
            return
        paused = []
        for row in rows:
            stream = self._batch.rows[row]
            stream.paused = self._batch.filter([row])
            stream.phase = Phase.WAITING
            stream.group.rows -= 1
            paused.append(stream)
        gone = set(rows)
        self._batch = self._batch.filter([i for i in range(len(self._batch)) if i not in gone])
        self.scheduler.requeue(paused)
        self.events.on_paused(len(paused))

    def _admit(self, streams: list[Stream]) -> None:
        """Streams that got a row place: their state, on the engine thread (a fresh zero state, or the
        caller's, a session's on the host, on the backend's device). A paused stream rejoins the batch
        at once with its own row."""
        now = time.perf_counter()
        resumed = [s for s in streams if s.paused is not None]
        if resumed:
            self.scheduler.ingesting = [s for s in self.scheduler.ingesting if s.paused is None]
            self._batch = Batch.concatenate([self._batch, *(s.paused for s in resumed)])
            for stream in resumed:
                stream.paused, stream.phase = None, Phase.DECODING
        for stream in streams:
            if stream.phase is Phase.DECODING:
                continue
            stream.state = self.backend.zero_state() if stream.state is None else np.asarray(stream.state, dtype=np.float32)
            self.events.on_queue_time(now - stream.t_submit)
            self.events.on_client_queue_time(stream.group.client.label, now - stream.t_submit)

    def _ingest(self) -> bool:
        """Run this loop's block (Scheduler.plan) in one backend call; streams whose whole prompt is in
        join the batch, together. Returns whether any joined."""
        block = self.scheduler.plan()
        joining = self._joining  # an attribute, so a fault part-way still ends the streams in it
        t0 = time.perf_counter()
        # row -> the state after its whole prompt, kept from an earlier stream (prompt_cache.py)
        recalled = {r: state for r, (s, end) in enumerate(block)
                    if self._whole_fresh_prompt(s, end) and (state := self.prompt_states.recall(s.feed)) is not None}
        computed = [(s, end) for r, (s, end) in enumerate(block) if r not in recalled]
        if computed:
            scored = [s.request.prompt_logprobs is not None and bool(s.request.prompt_ids) for s, _ in computed]
            before = np.stack([s.state for s, _ in computed], axis=2)  # (2, L, R, H)
            after, outputs = self.backend.ingest([s.feed[s.fed : end] for s, end in computed], before, outputs=any(scored))
        ingested, r = 0, 0
        for i, (stream, end) in enumerate(block):
            if i in recalled:
                stream.state = recalled[i]
            else:
                if scored[r]:
                    self._score_slice(stream, end, before[:, :, r], outputs[r])
                stream.state = after[:, :, r].copy()  # its own copy: a finished prompt's state may outlive the block's
                if self._whole_fresh_prompt(stream, end):
                    self.prompt_states.keep(stream.feed, stream.state)
                ingested += end - stream.fed
                r += 1
            self.scheduler.fairness.served(stream.group.client, prompt=end - stream.fed)
            stream.fed = end
            if stream.fed == len(stream.feed):
                self.scheduler.ingested(stream)
                if stream.request.prompt_logprobs is not None:
                    tops = tuple(stream.prompt_tops) if stream.request.prompt_logprobs else None
                    stream.prompt_scored = PromptScored(tuple(stream.prompt_lps), tops)
                    self.output.emit(stream, stream.prompt_scored)
                if stream.request.max_new_tokens == 0:
                    self.output.finish(stream, "length", stream.state)
                else:
                    state = stream.state if self.decoder is None else self._no_state
                    joining.append(Batch.single(stream, state, stream.seed, stream.request.counter, len(self._chars)))
        if joining:
            rows = [r for b in joining for r in b.rows]
            if self.decoder is not None:  # rows join the device batch in the host batch's order
                for single in joining:
                    stream, request = single.rows[0], single.rows[0].request
                    self.decoder.join(stream.state, request.params, stream.seed, request.counter, request.prompt_ids,
                                      single.bias[0] if request.logit_bias else None)
            for stream in rows:
                stream.state = None
            self._batch = Batch.concatenate([self._batch, *joining])
            self._joining = []
        if ingested:
            self.events.on_prefill(ingested, time.perf_counter() - t0)
        return bool(joining)

    def _whole_fresh_prompt(self, stream: Stream, end: int) -> bool:
        """Whether the slice up to `end` is a stream's whole prompt from the zero state, one `prompt_states`
        keeps (on the host: a device backend holds its rows' states itself)."""
        return self.decoder is None and stream.fed == 0 and end == len(stream.feed) and self.prompt_states.keeps(stream)

    def _score_slice(self, stream: Stream, end: int, before: np.ndarray, outputs: np.ndarray) -> None:
        """Log-probabilities of the slice's characters, each under the output that preceded it: the
        top h of the state before the slice, then the slice's own outputs. outputs (T, H)."""
        ids = np.array(stream.feed[stream.fed : end], dtype=np.int64)  # (T,)
        T, H = outputs.shape
        preceding = np.concatenate([before[0, -1:], outputs[:-1]])  # (T, H)
        logits = self.backend.logits(preceding.reshape(1, 1, T, H))  # (T, V): the head over each h, read as a batch of T rows
        lps = np.take_along_axis(log_softmax(logits), ids[:, None], axis=1)[:, 0].tolist()  # (T,)
        k = stream.request.prompt_logprobs
        tops = None
        if k:
            top_ids, top_lps = top_alternatives(logits, k)  # (T, k) each
            chars = self._chars
            tops = [tuple((chars[i], lp) for i, lp in zip(row_ids, row_lps))
                    for row_ids, row_lps in zip(top_ids.tolist(), top_lps.tolist())]
        if stream.fed == 0 and stream.request.fresh:  # the first character of a new stream has no context
            lps[0] = None
            if tops is not None:
                tops[0] = None
        stream.prompt_lps.extend(lps)
        if tops is not None:
            stream.prompt_tops.extend(tops)


    def _drop_finished(self) -> None:
        """Streams leave the batch between steps: keep the rows still running."""
        rows = self._batch.rows
        if any(s.finished for s in rows):
            keep = [i for i, s in enumerate(rows) if not s.finished]
            self._batch = self._batch.filter(keep)
            if self.decoder is not None:
                self.decoder.keep(keep)

    def _fail_in_flight(self, exc: Exception) -> None:
        """After a fault in a step: end every stream the step could have touched (the batch's, the ingesting
        and the joining ones), start from an empty batch. Waiting streams wait on."""
        message = f"generation failed on the server: {type(exc).__name__}"
        held = self.scheduler.clear()
        touched = [s for s in held if s.phase is not Phase.WAITING]
        for stream in [*self._batch.rows, *touched, *(r for b in self._joining for r in b.rows)]:
            self.output.finish(stream, "error", error=message)
        self.scheduler.enqueue([s for s in held if s.phase is Phase.WAITING])
        self._batch, self._joining = self._empty_batch(), []
        self._empty_device_batch()

    def _empty_device_batch(self) -> None:
        """After a fault: the device batch empties with the host's. A device that cannot even do that
        (a sticky CUDA error) cannot serve: the error ends the engine thread, so /ready and every
        request say 503 at once instead of failing one by one."""
        if self.decoder is not None:
            self.decoder.keep([])

    def _end_everything(self, reason: str) -> None:
        """The loop is over: every stream still known gets its end."""
        with self._cv:
            incoming, self._incoming = self._incoming, []
        for stream in [*self._batch.rows, *(r for b in self._joining for r in b.rows), *self.scheduler.clear(), *incoming]:
            try:
                self.output.finish(stream, reason, error="the engine stopped" if reason == "error" else None)
            except Exception:
                log.exception("ending a stream failed")
        self._batch, self._joining = self._empty_batch(), []
        try:
            self._empty_device_batch()
        except Exception:  # the loop is over either way
            log.exception("emptying the device batch failed")
        self._publish_counts()
        self._flush(force=True)

    def _publish_counts(self) -> None:
        running = len(self._batch) + len(self.scheduler.ingesting)
        waiting = self.scheduler.waiting
        with self._cv:
            self._counts = (running, waiting)

    def _flush(self, force: bool = False) -> None:
        """Hand the events over: at once when one cannot wait (an end, a stream's first characters), else
        once `deliver_interval_s` has passed since the last hand-over. If that fails, each listener's events
        are retried on their own, in order, and those that still fail wait for the next loop: a transient
        fault delays events, it never loses an end. A listener that keeps failing is given up after
        MAX_DELIVERY_ATTEMPTS loops."""
        if not self._undelivered:  # the usual case: hand the outbox over as it is
            if not self.output.outbox:
                return
            now = time.perf_counter()
            if not (force or self.output.urgent or now >= self._next_delivery):
                return
            self._next_delivery = now + self.config.deliver_interval_s
            outbox, self.output.outbox, self.output.urgent = self.output.outbox, [], False
            try:
                self.deliver(outbox)
                return
            except Exception:
                log.exception("delivering engine events failed; retrying listener by listener")
            out = [(listener, events, 0) for listener, events in outbox]
        else:
            out = self._undelivered + [(listener, events, 0) for listener, events in self.output.outbox]
            self.output.outbox, self.output.urgent = [], False
        self._undelivered = []
        blocked: set[int] = set()  # listeners with an earlier event still undelivered: keep their order
        for listener, events, attempts in out:
            if id(listener) not in blocked:
                try:
                    self.deliver([(listener, events)])
                    continue
                except Exception:
                    log.exception("delivering events to one listener failed")
            blocked.add(id(listener))
            if attempts + 1 < MAX_DELIVERY_ATTEMPTS:
                self._undelivered.append((listener, events, attempts + 1))

    def _empty_batch(self) -> Batch:
        return Batch.empty(self.backend.num_layers, self.backend.hidden, len(self.vocab))



def _deliver_directly(batch: Iterable[tuple[Any, list]]) -> None:
    for listener, events in batch:
        listener(events)
