"""The engine loop: continuous batching of every running stream, one character per step.

One thread owns the model and all batch state. Callers `submit` requests and `cancel` them from any
thread; the loop admits waiting streams between steps, ingests prompts in bounded slices, steps all
running rows together with the fused LSTM step, samples each row with its own controls and random
stream, and hands the resulting events to `deliver` once per step. Batch state lives here, outside
the model: streams join (concatenate) and leave (index) between steps.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..sampling import MAX_SEED, sample_next, uniforms
from ..vocab import CharVocab
from .runner import Runner
from .sessions import Session, SessionManager
from .stops import StopMatcher
from .types import Done, GenerationRequest, Overloaded, ShuttingDown, Token

log = logging.getLogger("charlstm.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64  # rows stepped together
    max_queue: int = 256  # streams waiting for a row; beyond this, submissions are refused
    prefill_chunk: int = 512  # prompt characters ingested between two decode steps
    start_char: str = "\n"  # fed when a fresh stream has no prompt, so the first character has context


class EngineStats(Protocol):
    """The numbers the engine reports. The metrics module implements this; the engine never sees Prometheus."""

    def on_step(self, batch_size: int, seconds: float) -> None: ...
    def on_prefill(self, chars: int, seconds: float) -> None: ...
    def on_queue_time(self, seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_inter_token(self, gaps: list[float]) -> None: ...
    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...
    def on_rejected(self, reason: str) -> None: ...
    def on_session_removed(self, reason: str) -> None: ...


@dataclass(frozen=True)
class EngineSnapshot:
    running: int
    waiting: int
    sessions: int
    steps: int
    ready: bool
    draining: bool


class _Stream:
    """One request in flight: its controls, its random stream, its text so far, its listener."""

    def __init__(self, request: GenerationRequest, listener: Any, seed: int, counter: int, session: Session | None,
                 state: torch.Tensor, feed: list[int], now: float, matcher: StopMatcher | None):
        self.request, self.listener, self.seed, self.counter, self.session = request, listener, seed, counter, session
        self.state = state  # (2, L, H) while the prompt is ingested
        self.feed, self.fed = feed, 0  # characters to ingest before generating, and how many are done
        self.matcher = matcher
        self.chars: list[str] = []
        self.lps: list[float] = []
        self.released = 0
        self.t_submit, self.t_last = now, 0.0
        self.cancelled = False
        self.finished = False


class Engine:
    def __init__(self, runner: Runner, vocab: CharVocab, sessions: SessionManager, config: EngineConfig = EngineConfig(),
                 deliver: Callable[[list[tuple[Any, list]]], None] | None = None):
        self.runner, self.vocab, self.sessions, self.config = runner, vocab, sessions, config
        self.deliver = deliver or _deliver_directly
        self.observers: list[EngineStats] = []
        self._cv = threading.Condition()
        self._incoming: deque[_Stream] = deque()
        self._cancelled: list[_Stream] = []
        self._admitted = 0  # submitted and not yet finished: the capacity the queue bound applies to
        self._running = 0
        self._draining = False
        self._deadline = float("inf")
        self._stop = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        # loop-owned state
        self._waiting: deque[_Stream] = deque()
        self._prefilling: deque[_Stream] = deque()
        self._rows: list[_Stream] = []
        self._outbox: list[tuple[Any, list]] = []
        self._reset_batch()
        start = config.start_char if config.start_char in vocab else vocab.chars[0]
        self._start_id = vocab.encode(start)[0]
        self._chars = vocab.chars

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="charlstm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
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
            alive = self._thread is not None and self._thread.is_alive() and not self._stop
            return EngineSnapshot(running=self._running, waiting=self._admitted - self._running, sessions=len(self.sessions),
                                  steps=self._steps, ready=alive and not self._draining, draining=self._draining)

    def submit(self, request: GenerationRequest, listener: Any) -> _Stream:
        """Queue a request. Raises Overloaded, ShuttingDown, SessionNotFound or SessionBusy at once."""
        self._reserve()
        try:
            session = self.sessions.acquire(request.session_id) if request.session_id else None
        except BaseException:
            self._unreserve()
            raise
        return self._enqueue(request, listener, session)

    def create_session(self, prompt_ids: list[int], seed: int | None, ttl_s: float | None, listener: Any) -> _Stream:
        """A new session primed with `prompt_ids`; its Done event carries the session's metadata."""
        self._reserve()
        seed = secrets.randbelow(MAX_SEED) if seed is None else seed
        try:
            session = self.sessions.create(self.runner.zero_state(), seed, ttl_s)
        except BaseException:
            self._unreserve()
            raise
        request = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=0, seed=seed, session_id=session.id)
        return self._enqueue(request, listener, session)

    def cancel(self, stream: _Stream) -> None:
        """The client went away: free the stream's row at the next step."""
        with self._cv:
            if not stream.finished:
                self._cancelled.append(stream)
                self._cv.notify_all()

    def add_observer(self, observer: EngineStats) -> None:
        self.observers.append(observer)

    # ------------------------------------------------------------------ admission
    def _reserve(self) -> None:
        """Take a place in the batch or the queue, or refuse at once."""
        with self._cv:
            if self._draining or self._stop:
                raise ShuttingDown("the server is shutting down and admits no new work")
            if self._admitted >= self.config.max_batch_size + self.config.max_queue:
                self.notify("on_rejected", "overloaded")
                raise Overloaded(f"all {self.config.max_batch_size} rows are busy and {self.config.max_queue} requests are waiting")
            self._admitted += 1

    def _unreserve(self) -> None:
        with self._cv:
            self._admitted -= 1
            self._cv.notify_all()

    def _enqueue(self, request: GenerationRequest, listener: Any, session: Session | None) -> _Stream:
        feed = list(request.prompt_ids)
        if session is not None:
            state, counter = session.state, session.counter
            seed = session.seed if request.seed is None else request.seed
            counter = counter if request.seed is None else 0
            fresh = session.position == 0
        else:
            state, counter, fresh = self.runner.zero_state(), 0, True
            seed = secrets.randbelow(MAX_SEED) if request.seed is None else request.seed
        if fresh and not feed:
            feed = [self._start_id]
        matcher = StopMatcher(request.stop) if request.stop else None
        stream = _Stream(request, listener, seed, counter, session, state, feed, time.perf_counter(), matcher)
        with self._cv:  # the place was reserved: a stream that gets here always runs (or ends at shutdown)
            self._incoming.append(stream)
            self._cv.notify_all()
        return stream

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._cancelled or self._rows or self._prefilling or self._waiting or self._stop):
                    self._cv.wait()
                if self._stop:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                cancelled, self._cancelled = self._cancelled, []
                past_deadline = self._draining and time.monotonic() >= self._deadline
            try:
                for stream in cancelled:
                    self._finish(stream, "cancelled")
                if past_deadline:
                    for stream in [*self._rows, *self._prefilling, *self._waiting]:
                        self._finish(stream, "shutdown")
                self._admit()
                self._prefill_slice()
                if self._rows:
                    self._decode_step()
                self._drop_finished()
            except Exception:  # a bug must not take the server down: fail the streams in flight, keep serving
                log.exception("engine step failed; ending the streams in flight")
                for stream in [*self._rows, *self._prefilling]:
                    self._finish(stream, "error")
                self._rows, self._prefilling = [], deque()
                self._reset_batch()
            self._flush()
        for stream in [*self._rows, *self._prefilling, *self._waiting, *self._incoming]:
            self._finish(stream, "shutdown")
        self._flush()

    def _admit(self) -> None:
        now = time.perf_counter()
        while self._waiting and len(self._rows) + len(self._prefilling) < self.config.max_batch_size:
            stream = self._waiting.popleft()
            if stream.finished:
                continue
            self._prefilling.append(stream)
            self.notify("on_queue_time", now - stream.t_submit)
        with self._cv:
            self._running = len(self._rows) + len(self._prefilling)

    def _prefill_slice(self) -> None:
        """Ingest prompts, at most `prefill_chunk` characters per loop, so running rows keep stepping."""
        budget = self.config.prefill_chunk
        t0, ingested = time.perf_counter(), 0
        while self._prefilling and budget > 0:
            stream = self._prefilling[0]
            if stream.finished:
                self._prefilling.popleft()
                continue
            n = min(budget, len(stream.feed) - stream.fed)
            if n > 0:
                stream.state = self.runner.prefill(stream.feed[stream.fed : stream.fed + n], stream.state)
                stream.fed += n
                ingested += n
                budget -= max(n, 32)  # a call has a fixed cost too
            if stream.fed == len(stream.feed):
                self._prefilling.popleft()
                if stream.request.max_new_tokens == 0:
                    self._finish(stream, "length", stream.state)
                else:
                    self._join(stream)
        if ingested:
            self.notify("on_prefill", ingested, time.perf_counter() - t0)

    def _reset_batch(self) -> None:
        V = len(self.vocab)
        self._state = self.runner.zero_state(0)  # (2, L, B, H)
        self._temperature = torch.zeros(0)
        self._top_k = torch.zeros(0, dtype=torch.long)
        self._top_p = torch.zeros(0)
        self._penalty = torch.zeros(0)
        self._seen = torch.zeros(0, V, dtype=torch.bool)  # (B, V)
        self._seeds = np.zeros(0, dtype=np.uint64)
        self._counters = np.zeros(0, dtype=np.uint64)
        self._penalised = 0

    def _join(self, stream: _Stream) -> None:
        p = stream.request.params
        seen = torch.zeros(1, len(self.vocab), dtype=torch.bool)
        seen[0, stream.request.prompt_ids] = True
        self._state = torch.cat([self._state, stream.state.unsqueeze(2)], dim=2)
        self._temperature = torch.cat([self._temperature, torch.tensor([p.temperature])])
        self._top_k = torch.cat([self._top_k, torch.tensor([p.top_k])])
        self._top_p = torch.cat([self._top_p, torch.tensor([p.top_p])])
        self._penalty = torch.cat([self._penalty, torch.tensor([p.repetition_penalty])])
        self._seen = torch.cat([self._seen, seen])
        self._seeds = np.append(self._seeds, np.uint64(stream.seed))
        self._counters = np.append(self._counters, np.uint64(stream.counter))
        self._penalised += p.repetition_penalty != 1.0
        stream.state = None
        self._rows.append(stream)

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        rows = self._rows
        logits = self.runner.logits(self._state)  # (B, V)
        u = torch.from_numpy(uniforms(self._seeds, self._counters))  # (B,)
        want_logprobs = any(s.request.logprobs for s in rows)
        ids, lps = sample_next(logits, self._temperature, self._top_k, self._top_p, self._penalty,
                               self._seen if self._penalised else None, u, want_logprobs)  # (B,), (B,) or None
        self._counters += np.uint64(1)
        if self._penalised:  # only rows with a penalty read their mask, and they are all in the batch now
            self._seen[torch.arange(len(rows)), ids] = True
        new_state = self.runner.start_step(ids, self._state)  # every row consumes its character, while ...
        now = time.perf_counter()
        ids_list = ids.tolist()
        lps_list = lps.tolist() if lps is not None else [0.0] * len(rows)
        gaps, ending = [], []
        chars = self._chars
        for row, (stream, char_id, lp) in enumerate(zip(rows, ids_list, lps_list)):
            if stream.finished:
                continue
            if stream.t_last:
                gaps.append(now - stream.t_last)
            else:
                self.notify("on_first_token", now - stream.t_submit)
            stream.t_last = now
            stream.chars.append(chars[char_id])
            stream.lps.append(lp)
            stream.counter += 1
            end = self._advance(stream)  # ... the rows' text is updated here
            if end is not None:
                ending.append((stream, row, *end))
        self._state = new_state()
        for stream, row, reason, cut in ending:
            self._finish(stream, reason, self._state[:, :, row].clone(), cut)
        self._steps += 1
        self.notify("on_step", len(rows), now - t0)
        if gaps:
            self.notify("on_inter_token", gaps)

    def _advance(self, stream: _Stream) -> tuple[str, int] | None:
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
        if cut > stream.released:
            self._emit_token(stream, cut)
        return None if reason is None else (reason, cut)

    def _emit_token(self, stream: _Stream, upto: int) -> None:
        start = stream.released
        lps = tuple(stream.lps[start:upto]) if stream.request.logprobs else None
        self._outbox.append((stream.listener, [Token(start, "".join(stream.chars[start:upto]), lps)]))
        stream.released = upto

    def _finish(self, stream: _Stream, reason: str, state: torch.Tensor | None = None, cut: int | None = None) -> None:
        if stream.finished:
            return
        stream.finished = True
        cut = len(stream.chars) if cut is None else cut
        if reason in ("shutdown", "error") and cut > stream.released:  # held-back characters were no stop string
            self._emit_token(stream, cut)
        session_meta = None
        if stream.session is not None:
            complete = reason in ("length", "stop") and state is not None
            consumed = len(stream.feed) + len(stream.chars)
            self.sessions.release(stream.session, state if complete else None, stream.counter if complete else None,
                                  consumed if complete else 0, stream.seed if complete else None)
            session_meta = stream.session.metadata()
        lps = tuple(stream.lps[:cut]) if stream.request.logprobs else None
        done = Done(text="".join(stream.chars[:cut]), finish_reason=reason, prompt_tokens=len(stream.request.prompt_ids),
                    completion_tokens=len(stream.chars), seed=stream.seed, logprobs=lps, session=session_meta)
        self._outbox.append((stream.listener, [done]))
        self.notify("on_finish", reason, len(stream.request.prompt_ids), len(stream.chars))
        with self._cv:
            self._admitted -= 1
            self._cv.notify_all()

    def _drop_finished(self) -> None:
        """Streams leave the batch between steps: keep the rows still running."""
        if not any(s.finished for s in self._rows):
            return
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        self._penalised -= sum(1 for s in self._rows if s.finished and s.request.params.repetition_penalty != 1.0)
        self._rows = [self._rows[i] for i in keep]
        idx = torch.tensor(keep, dtype=torch.long)
        self._state = self._state.index_select(2, idx)
        self._temperature, self._top_k = self._temperature[idx], self._top_k[idx]
        self._top_p, self._penalty, self._seen = self._top_p[idx], self._penalty[idx], self._seen[idx]
        self._seeds, self._counters = self._seeds[keep], self._counters[keep]
        if len(self._prefilling) and self._prefilling[0].finished:
            self._prefilling = deque(s for s in self._prefilling if not s.finished)
        with self._cv:
            self._running = len(self._rows) + len(self._prefilling)

    def _flush(self) -> None:
        if self._outbox:
            out, self._outbox = self._outbox, []
            try:
                self.deliver(out)
            except Exception:
                log.exception("delivering engine events failed")

    def notify(self, method: str, *args) -> None:
        """Report a number to every observer (also used by the session manager for evictions)."""
        for obs in self.observers:
            try:
                getattr(obs, method)(*args)
            except Exception:
                log.exception("engine observer %s failed", method)


def _deliver_directly(batch: Iterable[tuple[Any, list]]) -> None:
    for listener, events in batch:
        listener(events)
