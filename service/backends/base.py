"""The step-backend interface, and what every CPU backend shares: row shares, row padding, ingestion.

A backend is the arithmetic of the model and nothing else (vLLM's `Executor`, TGI's
`Model.generate_token`): it ingests a prompt into a state, advances a batch of states by one character
and turns states into logits. The engine holds the batch, the sampling and the streams, and reaches a
backend only through this class. Each backend (torch fp32, torch int8, ONNX Runtime fp32 and int8,
CUDA graphs) lives in a file of its own; `selector.py` builds and chooses them;
tests/backend_contract.py is the suite every one of them passes.

The guarantee that ties them: a row's numbers never depend on the other rows of its batch, or one seed
would write another text alone than under load. BLAS libraries pick their kernel by the number of rows,
and the kernels round differently, and which sizes share a kernel depends on the CPU: MKL (2024.2) on an
AVX-512 Xeon gives one row alone other bits than 2 to 160 rows; on an AVX2 EPYC 1 to 3 rows round one
way and 4 to 259 another. So each backend measures, when it is built, over which batch sizes its own
kernels give a row the same bits (`agreeing_rows`), and every call then sees between `min_rows` and
`max_rows` rows: a smaller batch is padded with copies of its first row, a larger one is cut into
shares. tests/test_runner.py and the contract suite pin it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..model import CharLSTM
from .fused import FusedWeights, pad_rows

log = logging.getLogger("charlstm.backends")

MIN_ROWS_PER_WORKER = 16  # below this, a share of the batch costs more per row than it saves (measured on 2 x 512)
ROW_PROBES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)  # batch sizes agreeing_rows tries
MIN_SHARE = 64  # agreeing_rows wants one rounding from min_rows to at least this many rows


def agreeing_rows(call: Callable[[int], torch.Tensor], what: str) -> tuple[int, int]:
    """(min_rows, max_rows): the range of batch sizes over which `call(B)` (the result for the first B
    rows of fixed inputs, (B, ...)) gives every row the same bits. The smallest min_rows whose range
    reaches MIN_SHARE wins; (1, 256) with a warning when none does."""
    agree, before = [], call(ROW_PROBES[0])
    for B in ROW_PROBES[1:]:  # two results at a time, so the probe leaves no large heap behind
        out = call(B)
        agree.append(torch.equal(out[: before.shape[0]], before))
        before = out
    for i, lo in enumerate(ROW_PROBES[:8]):
        hi = lo
        for j in range(i, len(agree)):
            if not agree[j]:
                break
            hi = ROW_PROBES[j + 1]
        if hi >= MIN_SHARE:
            return lo, hi
    log.warning("no batch-size range rounds every row alike for %s: a seed may write another text alone than in a batch", what)
    return 1, ROW_PROBES[-1]


class Backend:
    """One model's step on one device. Subclasses give `_step_rows` (and `_head_rows` when the head is
    theirs) and set `min_rows`/`max_rows` (the step's) and `head_rows` (the head's) from `agreeing_rows`.

    LSTM rows are independent within a step, so a large batch can be cut into contiguous shares that
    `workers` threads step at the same time, with one join per step. On two cores this beats two threads
    inside each kernel, which meet at a barrier after every kernel and stall whenever the event loop takes
    one of the cores (see benchmarks/README.md)."""

    name = "?"
    weights_kind = "fp32"  # or "int8": what --quantize narrows the choice to
    needs_module = True  # steps with the torch module's weights (or `weights`, copies made from them)

    def __init__(self, model: CharLSTM, workers: int = 1, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        model.eval()
        if next(model.parameters()).device != self.device:
            model = copy.deepcopy(model).to(self.device)
        self.model = model
        cfg = model.config
        self.num_layers, self.hidden, self.vocab_size = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
        self.weights = FusedWeights.from_model(model)
        self.min_rows, self.max_rows = 1, 1 << 30  # the step's rows a call; subclasses measure theirs
        self.head_rows = (1, 1 << 30)  # the head's
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (state, its logits) of the latest step that gave both
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="charlstm-step") if self.workers > 1 else None

    # --- what a subclass provides -------------------------------------------------------------

    def _step_rows(self, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """ids (B,) int64, state (2, L, B, H) -> new state (2, L, B, H), for min_rows <= B <= max_rows."""
        raise NotImplementedError

    def _head_rows(self, top: torch.Tensor) -> torch.Tensor:
        """top h (B, H) -> logits (B, V), for B within head_rows. The fp32 head by default."""
        return torch.addmm(self.weights.b_head, top, self.weights.w_head)

    def describe(self) -> dict:
        """What /info shows of this backend."""
        return {"name": self.name, "weights": self.weights_kind, "device": self.device.type, "workers": self.workers,
                "rows_per_call": [self.min_rows, self.max_rows], "head_rows_per_call": list(self.head_rows)}

    # --- the interface the engine uses ----------------------------------------------------------

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def zero_state(self, batch: int | None = None) -> torch.Tensor:
        shape = (2, self.num_layers, self.hidden) if batch is None else (2, self.num_layers, batch, self.hidden)
        return torch.zeros(shape, device=self.device)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """Next-character logits from a batched state (2, L, B, H) -> (B, V): the head over the top h
        (or the logits the step that made this very state already computed)."""
        last = self._last
        if last is not None and last[0] is state:
            return last[1]
        return self._rows_within(self._head_rows, state[0, -1], *self.head_rows)

    @staticmethod
    def _rows_within(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """fn over x's rows (B, ...) with every call seeing lo to hi rows."""
        B = x.shape[0]
        if B < lo:
            return fn(pad_rows(x, lo))[:B]
        if B > hi:
            return torch.cat([fn(x[a : a + hi]) for a in range(0, B, hi)])
        return fn(x)

    @torch.inference_mode()
    def ingest(self, slices: list[list[int]], state: torch.Tensor,
               outputs: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Feed each row of a block its own slice of prompt, every row at once: `slices` R lists of ids (of
        any lengths), state (2, L, R, H) -> (new state (2, L, R, H), outputs). With `outputs`, a (T_r, H)
        tensor a row: the top layer's h after each of its characters, what the head turns into the
        prediction of the next one (prompt log-probabilities); None without.

        Every character goes through the backend's own step, so a row's numbers are those of generating
        through it: the same alone, beside any other rows, and whatever the slice's length. A backend with
        a faster block (onnx_runtime.py's loop graph) gives the same bits, checked when it is built."""
        state = state.to(self.device)
        R = len(slices)
        order = sorted(range(R), key=lambda r: -len(slices[r]))  # longest first: the rows still going are a prefix
        s = state[:, :, order]  # (2, L, R, H)
        lengths = [len(slices[r]) for r in order]
        tops = []  # per step t: (n_t, H), the top h of the n_t rows that took a character
        for t in range(lengths[0] if R else 0):
            n = sum(1 for length in lengths if length > t)
            ids = torch.tensor([slices[r][t] for r in order[:n]], device=self.device)  # (n,)
            s = self.step(ids, s) if n == R else torch.cat([self.step(ids, s[:, :, :n]), s[:, :, n:]], dim=2)
            if outputs:
                tops.append(s[0, -1, :n])
        at = {r: i for i, r in enumerate(order)}  # row -> its place in `order`
        new_state = s[:, :, [at[r] for r in range(R)]]  # (2, L, R, H), rows back in order
        if not outputs:
            return new_state, None
        return new_state, [torch.stack([tops[t][at[r]] for t in range(len(slices[r]))]) if slices[r]
                           else state.new_zeros(0, self.hidden) for r in range(R)]

    def block_seconds(self, rows: int, chars: int) -> float | None:
        """About how long `ingest` takes for `rows` slices of `chars` characters, from what the backend
        measured when it was built; None where it measured nothing (the scheduler then keeps every
        slice within one `prefill_chunk`)."""
        return None

    def prefill(self, ids: list[int], state: torch.Tensor, outputs: bool = False):
        """One stream's prompt: `ingest` of a block of one row. ids: T ints; state (2, L, H) -> state
        (2, L, H), or (state, y (T, H)) with `outputs`. A state from elsewhere (a session on the host)
        moves to this backend's device first."""
        new_state, ys = self.ingest([ids], state.to(self.device).unsqueeze(2), outputs)
        # A copy made after the block's temporaries are freed fills their gap in the heap; sessions keep
        # these states for long, and the copy packs them tighter (14.9 against 17.0 KB a session, measured).
        final = new_state[:, :, 0].clone()
        return (final, ys[0]) if outputs else final

    def step(self, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Advance every row by one character. ids (B,) int64; state (2, L, B, H) -> new state (2, L, B, H)."""
        return self.start_step(ids, state, background=False)()

    def start_step(self, ids: torch.Tensor, state: torch.Tensor, background: bool = True) -> Callable[[], torch.Tensor]:
        """Begin a step; returns a function that waits for the new state (2, L, B, H).

        With `background`, every share of a large batch goes to the pool and the caller is free until it
        asks for the result (the engine updates each row's text meanwhile); without, the calling thread
        steps the first share itself. A batch too small to split is stepped at once either way; a batch
        under min_rows is padded, and no share holds more than max_rows rows. A backend whose step also
        yields the new state's logits (`_advance`) keeps them for the `logits` call that follows."""
        B = ids.shape[0]
        if B < self.min_rows:
            state, logits = self._advance(pad_rows(ids, self.min_rows), pad_rows(state, self.min_rows, dim=2))
            return self._joined([state[:, :, :B]], [None if logits is None else logits[:B]])
        shares = max(min(self.workers, B // MIN_ROWS_PER_WORKER), -(-B // self.max_rows))
        if shares <= 1:
            return self._joined(*zip(self._advance(ids, state)))
        bounds = [B * k // shares for k in range(shares + 1)]
        parts = list(zip(bounds[:-1], bounds[1:]))
        here = parts if self._pool is None else [] if background else [parts[0]]
        futures = [self._pool.submit(self._advance_share, ids[a:b], state[:, :, a:b]) for a, b in parts[len(here):]]
        done_here = [self._advance(ids[a:b], state[:, :, a:b]) for a, b in here]

        def wait() -> torch.Tensor:  # rows back in order
            states, logits = zip(*done_here, *(f.result() for f in futures))
            return self._joined(states, logits)()

        return wait

    def _joined(self, states, logits) -> Callable[[], torch.Tensor]:
        state = states[0] if len(states) == 1 else torch.cat(states, dim=2)  # (2, L, B, H)
        if all(x is not None for x in logits):
            self._last = (state, logits[0] if len(logits) == 1 else torch.cat(logits))
        return lambda: state

    def _advance(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(new state, its logits or None): `_step_rows` unless the backend's step yields both."""
        return self._step_rows(ids, state), None

    def _advance_share(self, ids: torch.Tensor, state: torch.Tensor):
        with torch.inference_mode():  # thread-local: a pool thread enters it for itself
            return self._advance(ids, state)
