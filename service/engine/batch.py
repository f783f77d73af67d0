"""The running batch: every per-row tensor the step and the sampler read, in one object.

Rows are streams. A `Batch` holds their recurrent state, their sampling controls, their penalty
masks and counts and their random streams, all in row order, and changes shape only through `filter` (rows
leave) and `concatenate` (rows join), in the manner of text-generation-inference's batches. A
per-row sampling control is a field of `SamplingParams`: the batch builds a tensor for each field,
so adding a control never touches this module. The model and the backend know nothing of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np

from ..sampling import SamplingParams, filtering, stream_key, temperature_scale

# One array per field of SamplingParams, typed by the field's default: (B,) int64 or float32.
CONTROL_DTYPES = {f.name: (np.int64 if isinstance(f.default, int) and not isinstance(f.default, bool) else np.float32)
                  for f in fields(SamplingParams)}


@dataclass
class Batch:
    rows: list[Any]  # the streams, in row order; each has `.request` (a GenerationRequest)
    state: np.ndarray  # (2, L, B, H) float32
    controls: dict[str, np.ndarray]  # name -> (B,), one per SamplingParams field
    seen: np.ndarray  # (B, V) bool: characters already in each row's prompt or text (repetition penalty)
    counts: np.ndarray  # (B, V) int32: times each row generated each character (presence and frequency penalties)
    bias: np.ndarray  # (B, V) float32: each row's logit bias (zeros for most rows)
    seeds: np.ndarray  # (B,) uint64
    keys: np.ndarray  # (B,) int64: each seed hashed once (`sampling.stream_key`), what its uniforms start from
    counters: np.ndarray  # (B,) uint64: draws made so far from each row's random stream
    constraints: list  # (B,) each row's Constraint or None
    fsm: np.ndarray  # (B,) int64: each constrained row's automaton state (-1: unconstrained, or its constraint has ended)

    @classmethod
    def empty(cls, num_layers: int, hidden: int, vocab_size: int) -> Batch:
        return cls(rows=[], state=np.zeros((2, num_layers, 0, hidden), dtype=np.float32),
                   controls={k: np.zeros(0, dtype=d) for k, d in CONTROL_DTYPES.items()},
                   seen=np.zeros((0, vocab_size), dtype=bool), counts=np.zeros((0, vocab_size), dtype=np.int32),
                   bias=np.zeros((0, vocab_size), dtype=np.float32),
                   seeds=np.zeros(0, dtype=np.uint64), keys=np.zeros(0, dtype=np.int64), counters=np.zeros(0, dtype=np.uint64), constraints=[],
                   fsm=np.zeros(0, dtype=np.int64))

    @classmethod
    def single(cls, row: Any, state: np.ndarray, seed: int, counter: int, vocab_size: int) -> Batch:
        """One row. state (2, L, H): the row's state after its prompt."""
        params = row.request.params
        seen = np.zeros((1, vocab_size), dtype=bool)  # (1, V)
        seen[0, row.request.prompt_ids] = True
        bias = np.zeros((1, vocab_size), dtype=np.float32)  # (1, V)
        for char_id, value in row.request.logit_bias:
            bias[0, char_id] = value
        return cls(rows=[row], state=state[:, :, None], bias=bias,
                   controls={k: np.array([getattr(params, k)], dtype=d) for k, d in CONTROL_DTYPES.items()},
                   seen=seen, counts=np.zeros((1, vocab_size), dtype=np.int32), seeds=np.array([seed], dtype=np.uint64),
                   keys=np.array([stream_key(seed)], dtype=np.int64),
                   counters=np.array([counter], dtype=np.uint64), constraints=[row.request.constraint],
                   fsm=np.array([-1 if row.request.constraint is None else 0], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def filter(self, keep: list[int]) -> Batch:
        """The batch of the rows at `keep` (in that order)."""
        if len(keep) == len(self.rows):
            return self
        idx = np.array(keep, dtype=np.int64)
        return Batch(rows=[self.rows[i] for i in keep], state=self.state[:, :, idx],
                     controls={k: t[idx] for k, t in self.controls.items()}, seen=self.seen[idx], counts=self.counts[idx],
                     bias=self.bias[idx],
                     seeds=self.seeds[keep], keys=self.keys[keep], counters=self.counters[keep], constraints=[self.constraints[i] for i in keep],
                     fsm=self.fsm[keep])

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """Rows of every batch, in order. One copy of each tensor, however many batches join."""
        batches = [b for b in batches if len(b)] or batches[:1]
        if len(batches) == 1:
            return batches[0]
        return cls(rows=[r for b in batches for r in b.rows], state=np.concatenate([b.state for b in batches], axis=2),
                   controls={k: np.concatenate([b.controls[k] for b in batches]) for k in batches[0].controls},
                   seen=np.concatenate([b.seen for b in batches]), counts=np.concatenate([b.counts for b in batches]),
                   bias=np.concatenate([b.bias for b in batches]), seeds=np.concatenate([b.seeds for b in batches]),
                   keys=np.concatenate([b.keys for b in batches]),
                   counters=np.concatenate([b.counters for b in batches]), constraints=[c for b in batches for c in b.constraints],
                   fsm=np.concatenate([b.fsm for b in batches]))

    # A batch's rows and controls never change (filter and concatenate make a new batch), so what the
    # step asks of them is worked out once per batch, not once per step.
    @cached_property
    def penalised(self) -> bool:
        """Some row has a repetition penalty: only then does the sampler read `seen`."""
        return bool((self.controls["repetition_penalty"] != 1.0).any())

    @cached_property
    def counted(self) -> bool:
        """Some row has a presence or frequency penalty: only then does the sampler read `counts`."""
        return bool(((self.controls["presence_penalty"] != 0.0) | (self.controls["frequency_penalty"] != 0.0)).any())

    @cached_property
    def biased(self) -> bool:
        """Some row has a logit bias: only then is `bias` added to the logits."""
        return any(r.request.logit_bias for r in self.rows)

    @cached_property
    def constrained(self) -> list[int]:
        """The rows with a constraint (usually none: then the step never looks at `fsm`)."""
        return [row for row, c in enumerate(self.constraints) if c is not None]

    def forbidden(self) -> np.ndarray | None:
        """(B, V) bool: what each constrained row may not write now; None when no row is held by one.
        Unconstrained rows (and rows whose constraint has ended) forbid nothing, so their logits keep every bit."""
        live = [row for row in self.constrained if self.fsm[row] >= 0]
        if not live:
            return None
        mask = np.zeros((len(self.rows), self.seen.shape[1]), dtype=bool)  # (B, V)
        for row in live:
            mask[row] = self.constraints[row].forbid[self.fsm[row]]
        return mask

    def advance_constraints(self, ids: np.ndarray) -> tuple[dict[int, bool], dict[int, str]]:
        """Each constrained row wrote ids[row] (B,): move its automaton. Returns the rows whose constraint
        ended at this character -> whether the character belongs to the text (False: it ended the match),
        and the rows whose text gets something else than the character (the automaton's own characters)."""
        ended, texts = {}, {}
        for row in self.constrained:
            state = self.fsm[row]
            if state < 0:
                continue
            c, char_id = self.constraints[row], int(ids[row])
            if c.pieces and (piece := c.pieces.get((int(state), char_id))) is not None:
                texts[row] = piece
            state = int(c.next[state, char_id])
            if state < 0:  # a character the pattern does not allow here: the text so far is the match
                ended[row] = False
            elif c.terminal[state]:  # nothing may follow
                ended[row] = True
            self.fsm[row] = -1 if row in ended else state
        return ended, texts

    @cached_property
    def filtered(self) -> bool:
        """Some row has a filter (`sampling.filtering`)."""
        return bool(filtering(**self.controls).any())

    @cached_property
    def plain(self) -> bool:
        """No row has a filter or a penalty: temperature and greedy only (`sampling.sample_plain`)."""
        return not (self.filtered or self.penalised or self.counted)  # a constraint only masks the logits

    @cached_property
    def temperature_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """(greedy (B,) bool, scale (B,)): `sampling.temperature_scale` of the rows' temperatures."""
        return temperature_scale(self.controls["temperature"])

    @cached_property
    def unit_scale(self) -> bool:
        """Every row's logits are divided by 1 (temperature 1 or greedy): the division can be skipped."""
        return bool((self.temperature_scale[1] == 1.0).all())

    @cached_property
    def any_greedy(self) -> bool:
        return bool(self.temperature_scale[0].any())

    @cached_property
    def wants_logprobs(self) -> bool:
        return any(r.request.logprobs for r in self.rows)

    @cached_property
    def top_logprobs(self) -> int:
        """The most alternatives any row asks for at each position (0: nobody asks)."""
        return int(self.controls["top_logprobs"].max()) if len(self.rows) else 0

    def record(self, ids: np.ndarray) -> None:
        """Every row drew character ids (B,): one draw of its random stream spent."""
        self.counters += np.uint64(1)
        if self.penalised or self.counted:
            rows = np.arange(len(self.rows))
            if self.penalised:
                self.seen[rows, ids] = True
            if self.counted:
                self.counts[rows, ids] += 1
