"""The engine loop: continuous batching of every running stream, a look of k steps at a time.

One thread owns the model and the `Batch`. Callers `submit` requests and `cancel` them from any
thread; the loop admits waiting streams between looks, ingests prompts in slices cut at fixed offsets
of each prompt, steps all running rows together with the fused LSTM step (k steps a look:
`EngineConfig.decode_steps`, or 1 when most rows end sooner), samples each row with its own controls
and random stream, updates each row's text once a look, and hands the resulting events to `deliver`
once a loop.

The engine knows nothing of sessions, stores or HTTP: a request brings the state it starts from and
a completed stream hands back the state it ended in. Every stream that was accepted gets exactly one
`Done`, whatever fails on the way, and gives its place back when it does.

With a `device_step` (service/engine/cuda_step.py, a GPU) the rows' states, controls and sampling live
on the device, and a look's k steps run there before the host sees their ids, in one copy. Either way
rows are admitted, cancelled and finished between looks, so each of those waits at most one look. A
row that ends inside a look (its length, a stop string) ignores the steps it took beyond its end and
hands back the state after its last character, which is kept for every step of the look.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..sampling import MAX_SEED, sample_next, sample_plain, top_alternatives, uniforms
from ..vocab import CharVocab
from .batch import Batch
from .runner import SHORT_PROMPT, Runner
from .stops import StopMatcher
from .types import Alternatives, Done, EngineUnavailable, GenerationRequest, Overloaded, PromptScored, ShuttingDown, Token

if TYPE_CHECKING:
    from .cuda_step import CudaStep

log = logging.getLogger("charlstm.engine")

MAX_DELIVERY_ATTEMPTS = 100  # loops a listener's events are retried before it is given up
RETRY_DELIVERY_S = 0.01  # an idle loop's wait before retrying undelivered events


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64  # rows stepped together
    max_queue: int = 256  # streams waiting for a row; beyond this, submissions are refused
    prefill_chunk: int = 512  # a prompt is ingested in slices cut at multiples of this, from its own start
    start_char: str = "\n"  # fed when a fresh stream has no prompt, so the first character has context
    decode_steps: int = 1  # steps a look: the rows' text is updated once per look (a device step must be built for as many)


class EngineStats(Protocol):
    """The numbers the engine reports. The metrics module implements this; the engine never sees Prometheus."""

    def on_step(self, batch_size: int, seconds: float, steps: int = 1) -> None: ...  # one look of `steps` steps
    def on_prefill(self, chars: int, seconds: float) -> None: ...
    def on_queue_time(self, seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_inter_token(self, gaps: list[float], counts: list[int]) -> None: ...  # gaps[i] seen counts[i] times
    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...
    def on_rejected(self, reason: str) -> None: ...
    # reported by the session layer through the same observers (Engine.notify)
    def on_session_created(self) -> None: ...
    def on_session_removed(self, reason: str) -> None: ...
    def on_session_store_call(self, operation: str, seconds: float, failed: bool) -> None: ...


@dataclass(frozen=True)
class EngineSnapshot:
    running: int  # in the batch or ingesting a prompt
    waiting: int  # accepted, waiting for a row
    steps: int
    ready: bool
    draining: bool
    failed: bool  # the engine thread died of an internal error: every request gets 503 until a restart


@dataclass
class _Look:
    """What one look produced, row by row: ids[row] (k ids), lps[row] (k floats) when someone asked,
    tops = (ids, logprobs), each [row][step][alternative], when someone asked for alternatives."""

    ids: list[list[int]]
    lps: list[list[float]] | None
    tops: tuple[list, list] | None
    state: Callable[[int, int], torch.Tensor]  # (row, steps into the look) -> that row's state (2, L, H) on the host
    settle: Callable[[], None] | None = None  # finish the look's work begun in the background
    fed: dict[int, int] | None = None  # row -> how many of its first steps fed its prompt's tail (no characters)


def _by_row(steps: list[torch.Tensor]) -> list[list]:
    """k tensors (B,) -> B lists of k values (one step: no stacking, the common case on the CPU)."""
    if len(steps) == 1:
        return [[v] for v in steps[0].tolist()]
    return torch.stack(steps, dim=1).tolist()


class Stream:
    """One request in flight: its random stream, its text so far, its listener."""

    def __init__(self, request: GenerationRequest, listener: Any, seed: int, feed: list[int], now: float,
                 state: torch.Tensor):
        self.request, self.listener, self.seed = request, listener, seed
        self.state: torch.Tensor | None = state  # (2, L, H): the caller's (None: zeros), then on the runner's device while the prompt is ingested; then the batch holds it
        self.feed, self.fed = feed, 0  # characters to ingest before generating, and how many are done
        self.matcher = StopMatcher(request.stop) if request.stop else None
        self.chars: list[str] = []
        self.lps: list[float] = []
        self.tops: list[Alternatives] = []  # alternatives at each generated character, when asked for
        self.prompt_lps: list[float | None] = []  # the prompt's log-probabilities, when asked for
        self.prompt_tops: list[Alternatives | None] = []
        self.prompt_scored: PromptScored | None = None
        self.released = 0  # characters already sent to the listener
        self.t_submit, self.t_last = now, 0.0
        self.finished = False


class Engine:
    def __init__(self, runner: Runner, vocab: CharVocab, config: EngineConfig = EngineConfig(),
                 deliver: Callable[[list[tuple[Any, list]]], None] | None = None, device_step: CudaStep | None = None):
        """device_step: step the batch there (its capacity bounds max_batch_size) instead of with `runner`,
        which then only ingests prompts (on the same device)."""
        if device_step is not None and device_step.batch.capacity < config.max_batch_size:
            raise ValueError(f"the device step holds {device_step.batch.capacity} rows, fewer than max_batch_size={config.max_batch_size}")
        if device_step is not None and device_step.max_steps != config.decode_steps:
            raise ValueError(f"the device step runs {device_step.max_steps} steps a look, decode_steps={config.decode_steps}")
        self.runner, self.vocab, self.config = runner, vocab, config
        self.device_step = device_step
        # in device mode the host Batch keeps rows and controls only; the state lives in device_step.batch
        self._no_state = torch.zeros(2, runner.num_layers, 0)
        self.deliver = deliver or _deliver_directly
        self.observers: list[EngineStats] = []
        self._cv = threading.Condition()
        # shared with callers, under _cv
        self._incoming: deque[Stream] = deque()
        self._cancelled: list[Stream] = []
        self._admitted = 0  # accepted and not yet finished: the capacity the queue bound applies to
        self._counts = (0, 0)  # (running, waiting) as of the end of the last loop
        self._draining = False
        self._deadline = float("inf")
        self._stop = False
        self._dead = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        # owned by the loop thread
        self._waiting: deque[Stream] = deque()
        self._prefilling: deque[Stream] = deque()
        self._joining: list[Batch] = []
        self._feeding: list[Stream] = []  # rows of the batch still feeding their prompt's tail (_feeds_in_batch)
        self._batch = self._empty_batch()
        self._outbox: list[tuple[Any, list]] = []
        self._undelivered: list[tuple[Any, list, int]] = []  # (listener, events, attempts) that failed to go out
        start = config.start_char if config.start_char in vocab else vocab.chars[0]
        self._start_id = vocab.encode(start)[0]
        self._chars = vocab.chars

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
        self.runner.close()

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

    def snapshot(self) -> EngineSnapshot:
        with self._cv:
            alive = self._thread is not None and self._thread.is_alive() and not self._stop and not self._dead
            running, waiting = self._counts
            return EngineSnapshot(running=running, waiting=waiting + len(self._incoming), steps=self._steps,
                                  ready=alive and not self._draining, draining=self._draining, failed=self._dead)

    def submit(self, request: GenerationRequest, listener: Any) -> Stream:
        """Queue a request; its events go to `listener`. Raises Overloaded, ShuttingDown or EngineUnavailable at once."""
        seed = secrets.randbelow(MAX_SEED) if request.seed is None else request.seed
        feed = list(request.prompt_ids)
        if request.fresh and not feed:
            feed = [self._start_id]
        with self._cv:
            if self._dead:
                self.notify("on_rejected", "engine_error")
                raise EngineUnavailable("the engine has stopped after an internal error; the server must be restarted")
            if self._draining or self._stop:
                self.notify("on_rejected", "shutting_down")
                raise ShuttingDown("the server is shutting down and admits no new work")
            if self._admitted >= self.config.max_batch_size + self.config.max_queue:
                self.notify("on_rejected", "overloaded")
                raise Overloaded(f"all {self.config.max_batch_size} rows are busy and {self.config.max_queue} requests are waiting")
            self._admitted += 1
            stream = Stream(request, listener, seed, feed, time.perf_counter(), request.state)
            self._incoming.append(stream)
            self._cv.notify_all()
        return stream

    def cancel(self, stream: Stream) -> None:
        """The client went away: the stream leaves the queue or the batch within one loop."""
        with self._cv:
            if not stream.finished:
                self._cancelled.append(stream)
                self._cv.notify_all()

    def add_observer(self, observer: EngineStats) -> None:
        self.observers.append(observer)

    def notify(self, method: str, *args) -> None:
        """Report a number to every observer; an observer that fails is logged, never fatal."""
        for obs in self.observers:
            try:
                getattr(obs, method)(*args)
            except Exception:
                log.exception("engine observer %s failed", method)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException:
            log.critical("the engine thread failed; every request now gets 503", exc_info=True)
            with self._cv:
                self._dead = True
                self._cv.notify_all()
        finally:
            self._end_everything("error" if self._dead else "shutdown")

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._cancelled or len(self._batch) or self._prefilling or self._waiting or self._stop):
                    if not self._cv.wait(RETRY_DELIVERY_S if self._undelivered else None):
                        break  # events wait for another try
                if self._stop:
                    return
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                cancelled, self._cancelled = self._cancelled, []
                past_deadline = self._draining and time.monotonic() >= self._deadline
            try:
                self._leave(cancelled, "cancelled")
                if past_deadline:
                    self._leave([*self._batch.rows, *self._prefilling, *self._waiting], "shutdown")
                self._admit()
                self._prefill_slices()
                if len(self._batch):
                    self._decode_step()
                self._drop_finished()
            except Exception as e:  # a fault must not take the server down: end the streams it touched, keep serving
                log.exception("engine step failed; ending the streams in the batch")
                self._fail_in_flight(e)
            self._publish_counts()
            self._flush()

    def _leave(self, streams: list[Stream], reason: str) -> None:
        """End streams wherever they are; the queues forget them now, the batch at the end of this loop."""
        if not streams:
            return
        for stream in streams:
            self._finish(stream, reason)
        self._waiting = deque(s for s in self._waiting if not s.finished)
        self._prefilling = deque(s for s in self._prefilling if not s.finished)
        self._drop_finished()

    def _admit(self) -> None:
        now = time.perf_counter()
        while self._waiting and len(self._batch) + len(self._prefilling) < self.config.max_batch_size:
            stream = self._waiting.popleft()
            # on the engine thread: a fresh zero state, or the caller's (a session's, on the host) on the runner's device
            stream.state = self.runner.zero_state() if stream.state is None else stream.state.to(self.runner.device)
            self._prefilling.append(stream)
            self.notify("on_queue_time", now - stream.t_submit)

    def _prefill_slices(self) -> None:
        """Ingest prompt slices until about `prefill_chunk` characters are done, so running rows keep stepping.

        A slice always ends at a multiple of `prefill_chunk` from its stream's own start (or at the
        prompt's end), so how a prompt is cut, and which kernel each slice takes, never depends on
        what else is in flight: the same request gives the same state alone or under load."""
        chunk, budget = self.config.prefill_chunk, self.config.prefill_chunk
        t0, ingested = time.perf_counter(), 0
        while self._prefilling and budget > 0:
            stream = self._prefilling[0]
            if self._feeds_in_batch(stream):  # the batch's steps feed the rest, a row among the others
                self._prefilling.popleft()
                self._feeding.append(stream)
                self._joining.append(Batch.single(stream, stream.state, stream.seed, stream.request.counter, len(self._chars)))
                continue
            end = min((stream.fed // chunk + 1) * chunk, len(stream.feed))
            if end > stream.fed:
                cost = max(end - stream.fed, 32)  # a call has a fixed cost too
                if ingested and cost > budget:
                    break  # the slice waits for the next loop: where it is cut does not change
                if stream.request.prompt_logprobs is not None and stream.request.prompt_ids:
                    before = stream.state
                    stream.state, outputs = self.runner.prefill(stream.feed[stream.fed : end], before, outputs=True)
                    self._score_slice(stream, end, before, outputs)
                else:
                    stream.state = self.runner.prefill(stream.feed[stream.fed : end], stream.state)
                ingested += end - stream.fed
                budget -= cost
                stream.fed = end
            if stream.fed == len(stream.feed):
                self._prefilling.popleft()
                if stream.request.prompt_logprobs is not None:
                    tops = tuple(stream.prompt_tops) if stream.request.prompt_logprobs else None
                    stream.prompt_scored = PromptScored(tuple(stream.prompt_lps), tops)
                    self._outbox.append((stream.listener, [stream.prompt_scored]))
                if stream.request.max_new_tokens == 0:
                    self._finish(stream, "length", stream.state.cpu())
                else:
                    vocab_size = len(self._chars)
                    state = stream.state if self.device_step is None else self._no_state
                    self._joining.append(Batch.single(stream, state, stream.seed, stream.request.counter, vocab_size))
        if self._joining:
            if self.device_step is not None:  # rows join the device batch in the host batch's order
                for stream in (r for b in self._joining for r in b.rows):
                    request = stream.request
                    self.device_step.batch.append(stream.state, request.params, stream.seed, request.counter,
                                                  request.prompt_ids)
            for stream in (r for b in self._joining for r in b.rows):
                stream.state = None
            self._batch = Batch.concatenate([self._batch, *self._joining])
            self._joining = []
        if ingested:
            self.notify("on_prefill", ingested, time.perf_counter() - t0)

    def _feeds_in_batch(self, stream: Stream) -> bool:
        """A prompt's short tail (the whole of a short prompt) is fed by the batch's own steps: on its own it
        would take SHORT_PROMPT steps of one row while every other row waits; in the batch each character
        costs a row of a step it takes anyway. The row's state comes out bit for bit the same (every step
        gives a row the same bits at any batch size; runner.MIN_ROWS_PER_CALL). On the host only, and not
        where the prompt is scored or only its state is wanted."""
        tail = len(stream.feed) - stream.fed
        return (self.device_step is None and 0 < tail <= SHORT_PROMPT and stream.request.prompt_logprobs is None
                and stream.request.max_new_tokens > 0)

    def _score_slice(self, stream: Stream, end: int, before: torch.Tensor, outputs: torch.Tensor) -> None:
        """Log-probabilities of the slice's characters, each under the output that preceded it: the
        top h of the state before the slice, then the slice's own outputs. outputs (T, H)."""
        ids = torch.tensor(stream.feed[stream.fed : end], dtype=torch.long, device=outputs.device)  # (T,)
        T, H = outputs.shape
        preceding = torch.cat([before[0, -1:], outputs[:-1]])  # (T, H)
        logits = self.runner.logits(preceding.view(1, 1, T, H))  # (T, V): the head over each h, read as a batch of T rows
        lps = torch.log_softmax(logits, dim=-1).gather(1, ids.unsqueeze(1)).squeeze(1).tolist()  # (T,)
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

    def _decode_step(self) -> None:
        """One look: k steps of every row (on the device, or here), then each row's new characters at once.

        k is the configured steps a look, or 1 when most rows end sooner (counting the prompt characters
        a row still feeds, which take steps too). A row that ends inside a look
        (its length, a stop string) ignores the steps it took beyond its end; its state after its last
        character is kept for it (a session continues exactly)."""
        t0 = time.perf_counter()
        batch = self._batch
        k = self.config.decode_steps
        if k > 1 and 2 * max(s.request.max_new_tokens - len(s.chars) + len(s.feed) - s.fed for s in batch.rows) < k:
            k = 1  # most rows end sooner than a whole look
        look = self._device_look(batch, k) if self.device_step is not None else self._host_look(batch, k)
        self._take_look(batch.rows, k, look, t0)

    def _host_look(self, batch: Batch, k: int) -> _Look:
        """k steps with the runner: sample every row, record, step. The last step runs in the background
        (the step workers) while the rows' text is updated; `settle` waits for it."""
        ids_steps, lps_steps, tops_steps, states = [], [], [], []
        top_k = batch.top_logprobs
        state = batch.state
        tails = self._tails(batch, k)  # row -> the prompt characters it feeds in this look
        for j in range(k):
            fed = [row for row, tail in tails.items() if j < len(tail)]  # rows fed a prompt character at this step
            if len(fed) == len(batch):  # nobody draws (a lone stream's prompt): placeholders the look skips
                ids = torch.tensor([tails[row][j] for row in fed])  # (B,), every row in order
                lps = torch.zeros(len(fed)) if batch.wants_logprobs else None
                if top_k:
                    tops_steps.append((torch.zeros(len(fed), top_k, dtype=torch.long), torch.zeros(len(fed), top_k)))
            else:
                logits = self.runner.logits(state)  # (B, V)
                u = torch.from_numpy(uniforms(batch.seeds, batch.counters))  # (B,)
                if batch.plain:  # the batch's scale is worked out once: fewer kernels, most of a lone row's sampling
                    greedy, scale = batch.temperature_scale  # (B,), (B,)
                    ids, lps = sample_plain(logits, scale, greedy, u, batch.wants_logprobs, any_greedy=batch.any_greedy)
                else:
                    ids, lps = sample_next(logits, **batch.controls, seen=batch.seen if batch.penalised else None, u=u,
                                           want_logprobs=batch.wants_logprobs,
                                           counts=batch.counts if batch.counted else None)  # (B,), (B,) or None
                if top_k:  # someone asked for alternatives: (B, k) ids and log-probabilities
                    tops_steps.append(top_alternatives(logits, top_k))
                if fed:  # these rows take their prompt's next character instead of the draw, which they do not spend
                    ids[fed] = torch.tensor([tails[row][j] for row in fed])
            batch.record(ids, fed)
            ids_steps.append(ids)
            if lps is not None:
                lps_steps.append(lps)
            if j < k - 1:
                state = self.runner.step(ids, state)  # (2, L, B, H)
                states.append(state)
        new_state = self.runner.start_step(ids, state)  # every row consumes its last character, while ...

        def settle() -> None:  # ... the rows' text is updated
            batch.state = new_state()
            states.append(batch.state)

        tops = None
        if top_k:  # (n, k, top_k) each
            tops = tuple(torch.stack(t, dim=1).tolist() for t in zip(*tops_steps))
        return _Look(ids=_by_row(ids_steps), lps=_by_row(lps_steps) if lps_steps else None, tops=tops,
                     state=lambda row, steps: states[steps - 1][:, :, row].clone(), settle=settle,
                     fed={row: len(tail) for row, tail in tails.items()} or None)

    def _tails(self, batch: Batch, k: int) -> dict[int, list[int]]:
        """Rows still feeding their prompt's tail -> the characters they feed in this look (at most k);
        their streams count them as ingested now."""
        if not self._feeding:
            return {}
        feeding = {id(s) for s in self._feeding}
        tails = {}
        for row, stream in enumerate(batch.rows):
            if id(stream) in feeding:
                tails[row] = stream.feed[stream.fed : stream.fed + k]
                stream.fed += len(tails[row])
        self._feeding = [s for s in self._feeding if s.fed < len(s.feed)]
        return tails

    def _device_look(self, batch: Batch, k: int) -> _Look:
        """k steps on the device: the ids come back in one copy, figures only when someone asks for them."""
        device, n = self.device_step, len(batch)
        if device.batch.size != n:  # they join and leave together; a difference would give rows others' characters
            raise RuntimeError(f"the device batch holds {device.batch.size} rows, the host batch {n}")
        full = batch.filtered or batch.penalised or batch.counted  # else the lean sampler
        ids = device.decode(k, full).T.tolist()  # n rows of k ids
        lps = device.batch.hist_lps[:k, :n].T.tolist() if batch.wants_logprobs else None
        tops = None
        if batch.top_logprobs:  # (n, k, top_k) each
            tops = tuple(t.transpose(0, 1).tolist() for t in device.alternatives(k, n, batch.top_logprobs))
        return _Look(ids=ids, lps=lps, tops=tops, state=lambda row, taken: device.batch.row_state(row, after=taken))

    def _take_look(self, rows: list[Stream], k: int, look: _Look, t0: float) -> None:
        """Each row's characters of the look: its text, figures, stop strings and end."""
        now = time.perf_counter()
        gaps, counts, ending = [], [], []
        chars, ids_of, lps_of, tops_of, fed_of = self._chars, look.ids, look.lps, look.tops, look.fed
        for row, stream in enumerate(rows):
            if stream.finished:
                continue
            request = stream.request
            fed = fed_of.get(row, 0) if fed_of else 0  # the look's first steps fed this row's prompt
            take = min(k - fed, request.max_new_tokens - len(stream.chars))
            if take <= 0:
                continue
            if stream.t_last:
                gap = now - stream.t_last
            else:
                gap = 0.0
                self.notify("on_first_token", now - stream.t_submit)
            stream.t_last = now
            got = ids_of[row] if take == k else ids_of[row][fed : fed + take]
            lps = None if lps_of is None else lps_of[row][fed:] if fed else lps_of[row]
            tops = None
            if tops_of is not None and (want := request.params.top_logprobs):
                top_ids, top_lps = tops_of[0][row], tops_of[1][row]
                tops = [tuple((chars[i], v) for i, v in zip(top_ids[j][:want], top_lps[j][:want])) for j in range(fed, fed + take)]
            before = len(stream.chars)
            if stream.matcher is None:  # only the length can end it: everything at once
                if take == 1:
                    stream.chars.append(chars[got[0]])
                else:
                    stream.chars.extend(map(chars.__getitem__, got))
                if lps is not None:
                    stream.lps.extend(lps[:take])
                if tops is not None:
                    stream.tops.extend(tops)
                end = self._advance(stream)
            else:  # a stop string may end it at any of these characters
                end = None
                for j, char_id in enumerate(got):
                    stream.chars.append(chars[char_id])
                    if lps is not None:
                        stream.lps.append(lps[j])
                    if tops is not None:
                        stream.tops.append(tops[j])
                    end = self._advance(stream, emit=False)
                    if end is not None:
                        break
                if end is None:
                    self._advance(stream)  # releases what can no longer grow into a stop string
                elif end[1] > stream.released:
                    self._emit_token(stream, end[1])
            taken = len(stream.chars) - before
            if gap:  # the characters of a look arrive together: each counts the look's mean gap
                gaps.append(gap / taken)
                counts.append(taken)
            if end is not None:
                ending.append((stream, row, *end, fed + taken))
        if look.settle is not None:
            look.settle()
        for stream, row, reason, cut, steps in ending:
            state = look.state(row, steps) if stream.request.return_state else None
            self._finish(stream, reason, state, cut)
        self._steps += k
        self.notify("on_step", len(rows), now - t0, k)
        if gaps:
            self.notify("on_inter_token", gaps, counts)

    def _advance(self, stream: Stream, emit: bool = True) -> tuple[str, int] | None:
        """Release what is safe to show; on a stop string or at its length, say why and where the text ends."""
        total = len(stream.chars)
        cut, reason = total, None
        if stream.matcher is not None:
            held, stop_len = stream.matcher.check("".join(stream.chars[-stream.matcher.longest :]))
            if stop_len:
                cut, reason = total - stop_len, "stop"
            else:
                cut = total - held
        if reason is None and total >= stream.request.max_new_tokens:
            cut, reason = total, "length"
        if emit and cut > stream.released:
            self._emit_token(stream, cut)
        return None if reason is None else (reason, cut)

    def _emit_token(self, stream: Stream, upto: int) -> None:
        if not stream.request.stream_tokens:  # a plain request waits for its Done alone
            stream.released = upto
            return
        start = stream.released
        lps = tuple(stream.lps[start:upto]) if stream.request.logprobs else None
        tops = tuple(stream.tops[start:upto]) if stream.request.params.top_logprobs else None
        self._outbox.append((stream.listener, [Token(start, "".join(stream.chars[start:upto]), lps, tops)]))
        stream.released = upto

    def _finish(self, stream: Stream, reason: str, state: torch.Tensor | None = None, cut: int | None = None,
                error: str | None = None) -> None:
        """The one way a stream ends: exactly one Done, and its place given back, whatever fails here."""
        if stream.finished:
            return
        stream.finished = True
        try:
            done = self._done(stream, reason, state, cut, error)
        except Exception as e:  # building the answer failed: the client still gets an end
            log.exception("finishing a stream failed")
            done = Done(text="", finish_reason="error", prompt_tokens=0, completion_tokens=0, seed=stream.seed,
                        error=f"finishing the stream failed: {type(e).__name__}")
        finally:
            with self._cv:
                self._admitted -= 1
                self._cv.notify_all()
        self._outbox.append((stream.listener, [done]))
        self.notify("on_finish", done.finish_reason, done.prompt_tokens, done.completion_tokens)

    def _done(self, stream: Stream, reason: str, state: torch.Tensor | None, cut: int | None, error: str | None) -> Done:
        request = stream.request
        cut = len(stream.chars) if cut is None else cut
        if reason in ("shutdown", "error") and cut > stream.released:  # held-back characters were no stop string
            self._emit_token(stream, cut)
        completed = reason in ("length", "stop") and state is not None
        return Done(text="".join(stream.chars[:cut]), finish_reason=reason, prompt_tokens=stream.fed,
                    completion_tokens=len(stream.chars), seed=stream.seed, counter=request.counter + len(stream.chars),
                    logprobs=tuple(stream.lps[:cut]) if request.logprobs else None,
                    top_logprobs=tuple(stream.tops[:cut]) if request.params.top_logprobs else None,
                    prompt=stream.prompt_scored,
                    state=state if completed and request.return_state else None, error=error)

    def _drop_finished(self) -> None:
        """Streams leave the batch between steps: keep the rows still running."""
        rows = self._batch.rows
        if any(s.finished for s in rows):
            keep = [i for i, s in enumerate(rows) if not s.finished]
            self._batch = self._batch.filter(keep)
            self._feeding = [s for s in self._feeding if not s.finished]
            if self.device_step is not None:
                self.device_step.batch.filter(keep)

    def _fail_in_flight(self, exc: Exception) -> None:
        """After a fault in a step: end every stream the step could have touched, start from an empty batch."""
        message = f"generation failed on the server: {type(exc).__name__}"
        for stream in [*self._batch.rows, *self._prefilling, *(r for b in self._joining for r in b.rows)]:
            self._finish(stream, "error", error=message)
        self._batch, self._prefilling, self._joining, self._feeding = self._empty_batch(), deque(), [], []
        self._empty_device_batch()

    def _empty_device_batch(self) -> None:
        """After a fault: the device batch empties with the host's. A device that cannot even do that
        (a sticky CUDA error) cannot serve: the error ends the engine thread, so /ready and every
        request say 503 at once instead of failing one by one."""
        if self.device_step is not None:
            self.device_step.batch.filter([])

    def _end_everything(self, reason: str) -> None:
        """The loop is over: every stream still known gets its end."""
        with self._cv:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for stream in [*self._batch.rows, *self._prefilling, *(r for b in self._joining for r in b.rows), *self._waiting]:
            try:
                self._finish(stream, reason, error="the engine stopped" if reason == "error" else None)
            except Exception:
                log.exception("ending a stream failed")
        self._batch, self._prefilling, self._joining, self._waiting = self._empty_batch(), deque(), [], deque()
        self._feeding = []
        try:
            self._empty_device_batch()
        except Exception:  # the loop is over either way
            log.exception("emptying the device batch failed")
        self._publish_counts()
        self._flush()

    def _publish_counts(self) -> None:
        with self._cv:
            self._counts = (len(self._batch) + len(self._prefilling), len(self._waiting))

    def _flush(self) -> None:
        """Hand this loop's events over. If that fails, each listener's events are retried on their own,
        in order, and those that still fail wait for the next loop: a transient fault delays events, it
        never loses an end. A listener that keeps failing is given up after MAX_DELIVERY_ATTEMPTS loops."""
        if not self._undelivered:  # the usual case: hand the outbox over as it is
            if not self._outbox:
                return
            outbox, self._outbox = self._outbox, []
            try:
                self.deliver(outbox)
                return
            except Exception:
                log.exception("delivering engine events failed; retrying listener by listener")
            out = [(listener, events, 0) for listener, events in outbox]
        else:
            out = self._undelivered + [(listener, events, 0) for listener, events in self._outbox]
            self._outbox = []
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
        return Batch.empty(self.runner.num_layers, self.runner.hidden, len(self.vocab))


def _deliver_directly(batch: Iterable[tuple[Any, list]]) -> None:
    for listener, events in batch:
        listener(events)
