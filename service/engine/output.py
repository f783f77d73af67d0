"""What a look's characters do to each stream: its text, figures, stop strings, length and end.

The step produces a `Look` (every row's ids of k steps); `Output.process` turns it into each stream's
text and events, and `Output.finish` is the one way a stream ends: exactly one `Done`, and its place
given back, whatever fails on the way. Events collect in `outbox`; the loop hands them over once a loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stream import Phase, Stream
from .types import Done, Token

log = logging.getLogger("charlstm.engine")


@dataclass
class Look:
    """What one look produced, row by row: ids[row] (k ids), lps[row] (k floats) when someone asked,
    tops = (ids, logprobs), each [row][step][alternative], when someone asked for alternatives."""

    ids: list[list[int]]
    lps: list[list[float]] | None
    tops: tuple[list, list] | None
    state: Callable[[int, int], np.ndarray]  # (row, steps into the look) -> that row's state (2, L, H) on the host
    settle: Callable[[], None] | None = None  # finish the look's work begun in the background
    ends: dict[int, tuple[int, bool]] | None = None  # row -> (step, its character stays): where its constraint ended it
    pieces: dict[int, dict[int, str]] | None = None  # row -> {step: text}: where its constraint writes other than the character


class Output:
    def __init__(self, chars: list[str], events, release: Callable[[Stream], None]):
        """chars: the vocabulary, by id. events: the engine's observers (EngineStats). release: gives a finished stream's
        place back in the engine's accounting (called once per stream)."""
        self.chars, self.events, self.release = chars, events, release
        self.outbox: list[tuple[Any, list]] = []
        self.served: dict[str, list] = {}  # client id -> [Client, characters generated] since the engine last took them
        self.urgent = False  # the outbox holds an event that must not wait (an end, a stream's first characters)
        self.single_chars = all(len(c) == 1 for c in chars)  # a row's text is then its characters, one string each

    def process(self, rows: list[Stream], k: int, look: Look) -> None:
        """Each row's characters of the look: its text, figures, stop strings and end."""
        now = time.perf_counter()
        gaps, counts, ending = [], [], []
        chars, ids_of, lps_of, tops_of, served = self.chars, look.ids, look.lps, look.tops, self.served
        ends, pieces, outbox, finished = look.ends, look.pieces, self.outbox, Phase.FINISHED
        for row, stream in enumerate(rows):
            if stream.phase is finished:
                continue
            request = stream.request
            before = len(stream.chars)
            take = min(k, request.max_new_tokens - before)
            bound = ends.get(row) if ends else None  # its constraint ended it at this step of the look
            if bound is not None and bound[0] + 1 <= take:
                take = bound[0] + 1
            else:
                bound = None  # the length ends it first
            if take <= 0:
                continue
            if stream.t_last:
                gap = now - stream.t_last
            else:
                gap = 0.0
                self.events.on_first_token(now - stream.t_submit)
            stream.t_last = now
            got = ids_of[row] if take == k else ids_of[row][:take]
            lps = None if lps_of is None else lps_of[row]
            texts = pieces.get(row) if pieces else None
            if before == 0 and (constraint := request.constraint) is not None and constraint.prefix:  # its first characters
                texts = dict(texts or {})
                texts[0] = constraint.prefix + texts.get(0, chars[got[0]])
            tops = None
            if tops_of is not None and (want := request.params.top_logprobs):
                top_ids, top_lps = tops_of[0][row], tops_of[1][row]
                tops = [tuple((chars[i], v) for i, v in zip(top_ids[j][:want], top_lps[j][:want])) for j in range(take)]
            if stream.matcher is None and bound is None and texts is None:
                # the common case, inline: only the length can end it, and everything made is released at once
                text = chars[got[0]] if take == 1 else "".join(map(chars.__getitem__, got))
                if self.single_chars:
                    stream.chars.extend(text)
                else:
                    stream.chars.extend(map(chars.__getitem__, got))
                total = before + take
                if lps is not None:
                    stream.lps.extend(lps[:take])
                if tops is not None:
                    stream.tops.extend(tops)
                if request.stream_tokens:
                    start = stream.released
                    if start == 0:
                        self.urgent = True  # time to first character is not held back
                    if start != before or not self.single_chars:
                        text = "".join(stream.chars[start:total])
                    outbox.append((stream.listener, [Token(start, text, tuple(stream.lps[start:total]) if request.logprobs else None,
                                                           tuple(stream.tops[start:total]) if request.params.top_logprobs else None)]))
                stream.released, steps, taken = total, take, take
                end = ("length", total) if total >= request.max_new_tokens else None
            elif bound is None and texts is None and tops is None and self.single_chars:  # stop strings: searched once
                steps, end = self._stops_at_once(stream, got, take, chars, lps)
                taken = steps
            else:  # a stop string, the constraint or the length may end it at any of these characters
                steps, end = self._one_by_one(stream, got, take, chars, lps, tops, texts, bound)
                taken = len(stream.chars) - before
            stream.steps += steps
            client = stream.group.client
            entry = served.get(client.id)
            if entry is None:
                served[client.id] = [client, taken]
            else:
                entry[1] += taken
            if gap:  # the characters of a look arrive together: each counts the look's mean gap
                gaps.append(gap / taken)
                counts.append(taken)
            if end is not None:
                ending.append((stream, row, *end, steps))
        if look.settle is not None:
            look.settle()
        for stream, row, reason, cut, steps in ending:
            state = look.state(row, steps) if stream.request.return_state else None
            self.finish(stream, reason, state, cut)
        if gaps:
            self.events.on_inter_token(gaps, counts)

    def _stops_at_once(self, stream: Stream, got: list[int], take: int, chars: list[str],
                       lps: list[float] | None) -> tuple[int, tuple[str, int] | None]:
        """A look's characters for a row with stop strings (no constraint, no alternatives, a vocabulary of
        single characters): its new text searched once for the first stop string that ends in it, instead
        of a check after each character (`_one_by_one`, which it gives the same text and events).
        Returns (steps taken, the end or None)."""
        matcher, before = stream.matcher, len(stream.chars)
        text = "".join(map(chars.__getitem__, got))
        window = max(0, before - matcher.longest + 1)  # where a stop string ending in the new text may start
        found = matcher.first_in("".join(stream.chars[window:]) + text, before - window)
        steps = take if found is None else found[0] - (before - window)
        stream.chars.extend(text[:steps])
        if lps is not None:
            stream.lps.extend(lps[:steps])
        if found is None:
            return steps, self._advance(stream)  # releases what can no longer grow into a stop string
        cut = before + steps - found[1]
        if cut > stream.released:
            self._emit_token(stream, cut)
        return steps, ("stop", cut)

    def _one_by_one(self, stream: Stream, got: list[int], take: int, chars: list[str], lps: list[float] | None,
                    tops: list | None, texts: dict[int, str] | None, bound: tuple[int, bool] | None
                    ) -> tuple[int, tuple[str, int] | None]:
        """A look's characters one at a time, until one ends the stream: (steps taken, the end or None).
        A step whose constraint writes more than its character (`texts`) gives each further character
        log-probability 0 (the constraint, not the model, chose it)."""
        end = None
        for j, char_id in enumerate(got):
            char = chars[char_id]
            piece = char if texts is None else texts.get(j, char)
            own = max(piece.find(char), 0)  # where the model's character stands (an outside one takes its place)
            whole = True  # the step's whole text went in
            for n, c in enumerate(piece):
                stream.chars.append(c)
                if lps is not None:
                    stream.lps.append(lps[j] if n == own else 0.0)
                if tops is not None:
                    stream.tops.append(tops[j] if n == own else ((c, 0.0),))
                end = self._advance(stream, emit=False)
                if end is not None and (end[0] == "stop" or n < len(piece) - 1):
                    whole = False
                    break
            if bound is not None and j == take - 1 and whole and (end is None or end[0] != "stop"):
                end = ("stop", len(stream.chars) - (0 if bound[1] else 1))  # the constraint's end; a character that broke the match is cut
            if end is not None:
                if end[1] > stream.released:
                    self._emit_token(stream, end[1])
                return j + 1, end
        self._advance(stream)  # releases what can no longer grow into a stop string
        return len(got), None

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
        if start == 0:
            self.urgent = True  # time to first character is not held back
        lps = tuple(stream.lps[start:upto]) if stream.request.logprobs else None
        tops = tuple(stream.tops[start:upto]) if stream.request.params.top_logprobs else None
        self.outbox.append((stream.listener, [Token(start, "".join(stream.chars[start:upto]), lps, tops)]))
        stream.released = upto

    def emit(self, stream: Stream, event: Any) -> None:
        self.outbox.append((stream.listener, [event]))
        self.urgent = True

    def finish(self, stream: Stream, reason: str, state: np.ndarray | None = None, cut: int | None = None,
               error: str | None = None) -> None:
        """The one way a stream ends: exactly one Done, and its place given back, whatever fails here."""
        if not stream.end():
            return
        try:
            done = self._done(stream, reason, state, cut, error)
        except Exception as e:  # building the answer failed: the client still gets an end
            log.exception("finishing a stream failed")
            done = Done(text="", finish_reason="error", prompt_tokens=0, completion_tokens=0, seed=stream.seed,
                        error=f"finishing the stream failed: {type(e).__name__}")
        finally:
            self.release(stream)
        self.outbox.append((stream.listener, [done]))
        self.urgent = True
        self.events.on_finish(done.finish_reason, done.prompt_tokens, done.completion_tokens)

    def _done(self, stream: Stream, reason: str, state: np.ndarray | None, cut: int | None, error: str | None) -> Done:
        request = stream.request
        cut = len(stream.chars) if cut is None else cut
        if reason in ("shutdown", "error") and cut > stream.released:  # held-back characters were no stop string
            self._emit_token(stream, cut)
        completed = reason in ("length", "stop") and state is not None
        return Done(text="".join(stream.chars[:cut]), finish_reason=reason, prompt_tokens=stream.fed,
                    completion_tokens=stream.steps, seed=stream.seed, counter=request.counter + stream.steps,
                    logprobs=tuple(stream.lps[:cut]) if request.logprobs else None,
                    top_logprobs=tuple(stream.tops[:cut]) if request.params.top_logprobs else None,
                    prompt=stream.prompt_scored,
                    state=state if completed and request.return_state else None, error=error)
