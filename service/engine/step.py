"""A look: k steps of every row of the batch, with the backend and sampled here, or on the backend's device.

The step knows the batch and the arithmetic, nothing of stop strings, lengths or listeners: what its
ids mean for each stream is `output.Output`'s business.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..sampling import look_uniforms, sample_next, sample_plain, top_alternatives
from .batch import Batch
from .output import Look
from ..backends.base import Backend


def _by_row(steps: list[np.ndarray]) -> list[list]:
    """k arrays (B,) -> B lists of k values (one step: no stacking, the common case on the CPU)."""
    if len(steps) == 1:
        return [[v] for v in steps[0].tolist()]
    return np.stack(steps, axis=1).tolist()


QUIET_STEPS = 4  # a batch with nobody waiting takes looks of up to this many steps on the host


class Stepper:
    """Takes looks of the batch (every row's prompt is in: the scheduler's blocks ingest prompts)."""

    def __init__(self, backend: Backend, decode_steps: int, quiet_steps: int = QUIET_STEPS):
        self.backend, self.decoder, self.decode_steps, self.quiet_steps = backend, backend.decoder, decode_steps, quiet_steps

    def look(self, batch: Batch, quiet: bool = False, interrupted: Callable[[], bool] | None = None) -> tuple[int, Look]:
        """One look of k steps: k is the configured steps a look, or 1 when most rows end sooner. A
        `quiet` engine (no row just joined, nothing waiting or ingesting) takes looks of `quiet_steps` on
        the host, whatever the batch's size: each loop's fixed work (schedule, output, hand-over, a row's
        text and events) is then shared by several characters (measured: benchmarks/README.md). Such a
        look ends after any step at which `interrupted()` says someone came (a request, a cancellation),
        so nobody waits for it longer than for one step. The text is the same whatever k is."""
        k = self.decode_steps
        if quiet and k == 1 and self.decoder is None:
            k = self.quiet_steps
        else:
            interrupted = None  # a configured look runs whole
        if k > 1 and 2 * max(s.request.max_new_tokens - len(s.chars) for s in batch.rows) < k:
            k = 1  # most rows end sooner than a whole look
        if self.decoder is not None:
            return k, self.device_look(batch, k)
        return self.host_look(batch, k, interrupted)

    def host_look(self, batch: Batch, k: int, interrupted: Callable[[], bool] | None = None) -> tuple[int, Look]:
        """Up to k steps with the backend: sample every row, record, step; fewer when `interrupted()`
        says so after a step. The last step of a whole look runs in the background (the step workers)
        while the rows' text is updated; `settle` waits for it. Returns (the steps taken, the look)."""
        ids_steps, lps_steps, tops_steps, states = [], [], [], []
        ends: dict[int, tuple[int, bool]] = {}  # row -> (step, whether its character stays): where its constraint ended it
        pieces: dict[int, dict[int, str]] = {}  # row -> {step: text}: where its constraint writes other than the character
        top_k = batch.top_logprobs
        state = batch.state
        draws = look_uniforms(batch.keys, batch.counters, k)  # (k, B) float64: row j is step j's (each step spends one a row)
        for j in range(k):
            logits = self.backend.logits(state)  # (B, V)
            raw, forbid = logits, batch.forbidden() if batch.constrained else None
            if batch.biased:  # a row's bias changes its draw; its log-probabilities stay the model's (raw)
                logits = logits + batch.bias
            if forbid is not None:  # constrained rows write only what their automaton allows; other rows keep every bit
                logits = np.where(forbid, np.float32(-np.inf), logits)
            u = draws[j]  # (B,) float64
            if batch.plain:  # the batch's scale is worked out once: fewer kernels, most of a lone row's sampling
                greedy, scale = batch.temperature_scale  # (B,), (B,)
                ids, lps = sample_plain(logits, scale, greedy, u, batch.wants_logprobs, any_greedy=batch.any_greedy, raw=raw,
                                        unit_scale=batch.unit_scale)
            else:
                ids, lps = sample_next(logits, **batch.controls, seen=batch.seen if batch.penalised else None, u=u,
                                       want_logprobs=batch.wants_logprobs,
                                       counts=batch.counts if batch.counted else None, raw=raw)  # (B,), (B,) or None
            if top_k:  # someone asked for alternatives: (B, k) ids and log-probabilities
                tops_steps.append(top_alternatives(raw, top_k))
            if batch.constrained:
                ended, texts = batch.advance_constraints(ids)
                for row, kept in ended.items():
                    ends.setdefault(row, (j, kept))
                for row, text in texts.items():
                    pieces.setdefault(row, {})[j] = text
            batch.record(ids)
            ids_steps.append(ids)
            if lps is not None:
                lps_steps.append(lps)
            if j == k - 1:
                break  # the look's last step: its characters are consumed below
            state = self.backend.step(ids, state)  # (2, L, B, H)
            states.append(state)
            if interrupted is not None and interrupted():
                break  # someone came: the look ends with the step just taken, its characters consumed
        # every row consumes its last character (an interrupted look has already), while the rows' text is updated
        last = self.backend.start_step(ids, state) if len(states) < len(ids_steps) else None

        def settle() -> None:
            if last is not None:
                states.append(last())
            batch.state = states[-1]

        tops = None
        if top_k:  # (n, k, top_k) each
            tops = tuple(np.stack(t, axis=1).tolist() for t in zip(*tops_steps))
        return len(ids_steps), Look(ids=_by_row(ids_steps), lps=_by_row(lps_steps) if lps_steps else None, tops=tops,
                                    state=lambda row, steps: states[steps - 1][:, :, row].copy(), settle=settle,
                                    ends=ends or None, pieces=pieces or None)

    def device_look(self, batch: Batch, k: int) -> Look:
        """k steps on the backend's device (its `Decoder`): it samples there, with the same definition."""
        decoder = self.decoder
        if decoder.size != len(batch):  # they join and leave together; a difference would give rows others' characters
            raise RuntimeError(f"the device batch holds {decoder.size} rows, the host batch {len(batch)}")
        full = batch.filtered or batch.penalised or batch.counted  # else the lean sampler
        ids, lps, tops = decoder.look(k, full, batch.wants_logprobs, batch.top_logprobs)
        return Look(ids=ids, lps=lps, tops=tops, state=lambda row, taken: decoder.row_state(row, after=taken))
