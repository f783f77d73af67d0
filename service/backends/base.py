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
shares. tests/unit/test_runner.py and the contract suite pin it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import numpy as np

from .fused import FusedWeights, pad_rows

log = logging.getLogger("charlstm.backends")

MIN_ROWS_PER_WORKER = 16  # below this, a share of the batch costs more per row than it saves (measured on 2 x 512)
ROW_PROBES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)  # batch sizes agreeing_rows tries
MIN_SHARE = 64  # agreeing_rows wants one rounding from min_rows to at least this many rows


_kernel_threads: int | None = None  # set_kernel_threads; None: the runtime's default


def set_kernel_threads(n: int) -> None:
    """Threads inside each kernel, for every backend built from now on (the `torch_threads` setting):
    torch's, where torch is already loaded (a torch backend built later sets it too), and ONNX Runtime's.
    Nothing here imports torch: a server that never builds a torch backend never pays for it."""
    global _kernel_threads
    _kernel_threads = n
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def kernel_threads() -> int:
    """Threads each kernel takes: the setting; else torch's where torch is loaded; else 1."""
    if _kernel_threads:
        return _kernel_threads
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 1


def agreeing_rows(call: Callable[[int], np.ndarray], what: str) -> tuple[int, int]:
    """(min_rows, max_rows): the range of batch sizes over which `call(B)` (the result for the first B
    rows of fixed inputs, (B, ...)) gives every row the same bits. The smallest min_rows whose range
    reaches MIN_SHARE wins; (1, 256) with a warning when none does."""
    agree, before = [], call(ROW_PROBES[0])
    for B in ROW_PROBES[1:]:  # two results at a time, so the probe leaves no large heap behind
        out = call(B)
        agree.append(np.array_equal(out[: before.shape[0]], before))
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


class DeviceLook(NamedTuple):
    """A look's figures from a `Decoder`, on the host, a list a row: ids (n, k); log-probabilities (n, k) when
    asked for; the alternatives (ids, log-probabilities), (n, k, top) each, when asked for."""

    ids: list[list[int]]
    lps: list[list[float]] | None
    tops: tuple[list, list] | None


class Decoder(Protocol):
    """The rows of a batch held on a backend's own device, sampled and stepped there, k steps a look
    (backends/cuda.py). The engine's host batch keeps the same rows in the same order: a row `join`s when
    its prompt is in, the rows that go on are `keep`t between looks, and the host sees each look's ids
    in one copy. A backend without one (every CPU backend) is stepped by the engine, which samples."""

    capacity: int  # the most rows at once
    max_steps: int  # the steps of a look
    size: int  # rows held now

    def join(self, state: np.ndarray, params: Any, seed: int, counter: int, seen_ids: list[int],
             bias: np.ndarray | None = None) -> int:
        """A row joins last: its state (2, L, H) after its prompt, its `SamplingParams`, its random stream, the
        characters its repetition penalty applies to, its logit bias (V,) float32 (None: none). Returns its row."""

    def keep(self, rows: list[int]) -> None:
        """Keep these rows, in this order; the others leave."""

    def look(self, k: int, full: bool, logprobs: bool, top: int) -> DeviceLook:
        """k steps of every row (1 or max_steps): sample, then advance. full: some row has a filter or a
        penalty (else the lean sampler); logprobs, top: the figures a row asked for."""

    def row_state(self, row: int, after: int | None = None) -> np.ndarray:
        """One row's state (2, L, H) float32 on the host: now, or after its `after`-th step of the last look."""


class Backend:
    """One model's step on one device. Subclasses give `_step_rows` (and `_head_rows` when the head is
    theirs) and set `min_rows`/`max_rows` (the step's) and `head_rows` (the head's) from `agreeing_rows`.

    LSTM rows are independent within a step, so a large batch can be cut into contiguous shares that
    `workers` threads step at the same time, with one join per step. On two cores this beats two threads
    inside each kernel, which meet at a barrier after every kernel and stall whenever the event loop takes
    one of the cores (see benchmarks/README.md).

    Arrays in and out are numpy's: states (2, L, B, H) float32, ids (B,) int64, logits (B, V) float32, so the
    engine, the sessions and a backend that needs no torch (ONNX Runtime) never import it."""

    name = "?"
    weights_kind = "fp32"  # or "int8": what --quantize narrows the choice to
    device_type = "cpu"
    decoder: Decoder | None = None  # the batch's rows on the backend's device (a GPU); None: the engine steps and samples

    def __init__(self, model, workers: int = 1):
        """model: a `store.LoadedModel` or a torch `CharLSTM` (`fused.tensors_of`)."""
        cfg = model.config
        self.num_layers, self.hidden, self.vocab_size = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
        self.weights = FusedWeights.from_model(model)
        self.min_rows, self.max_rows = 1, 1 << 30  # the step's rows a call; subclasses measure theirs
        self.head_rows = (1, 1 << 30)  # the head's
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (state, its logits) of the latest step that gave both
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="charlstm-step") if self.workers > 1 else None

    # --- what a subclass provides -------------------------------------------------------------

    def _step_rows(self, ids: np.ndarray, state: np.ndarray) -> np.ndarray:
        """ids (B,) int64, state (2, L, B, H) -> new state (2, L, B, H), for min_rows <= B <= max_rows."""
        raise NotImplementedError

    def _head_rows(self, top: np.ndarray) -> np.ndarray:
        """top h (B, H) -> logits (B, V), for B within head_rows."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What /info shows of this backend."""
        return {"name": self.name, "weights": self.weights_kind, "device": self.device_type, "workers": self.workers,
                "rows_per_call": [self.min_rows, self.max_rows], "head_rows_per_call": list(self.head_rows)}

    # --- the interface the engine uses ----------------------------------------------------------

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def zero_state(self, batch: int | None = None) -> np.ndarray:
        shape = (2, self.num_layers, self.hidden) if batch is None else (2, self.num_layers, batch, self.hidden)
        return np.zeros(shape, dtype=np.float32)

    def logits(self, state: np.ndarray) -> np.ndarray:
        """Next-character logits from a batched state (2, L, B, H) -> (B, V): the head over the top h
        (or the logits the step that made this very state already computed)."""
        last = self._last
        if last is not None and last[0] is state:
            return last[1]
        return self._rows_within(self._head_rows, state[0, -1], *self.head_rows)

    @staticmethod
    def _rows_within(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """fn over x's rows (B, ...) with every call seeing lo to hi rows."""
        B = x.shape[0]
        if B < lo:
            return fn(pad_rows(x, lo))[:B]
        if B > hi:
            return np.concatenate([fn(x[a : a + hi]) for a in range(0, B, hi)])
        return fn(x)

    def ingest(self, slices: list[list[int]], state: np.ndarray,
               outputs: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Feed each row of a block its own slice of prompt, every row at once: `slices` R lists of ids (of
        any lengths), state (2, L, R, H) -> (new state (2, L, R, H), outputs). With `outputs`, a (T_r, H)
        tensor a row: the top layer's h after each of its characters, what the head turns into the
        prediction of the next one (prompt log-probabilities); None without.

        Every character goes through the backend's own step, so a row's numbers are those of generating
        through it: the same alone, beside any other rows, and whatever the slice's length. A backend with
        a faster block (onnx_runtime.py's loop graph) gives the same bits, checked when it is built."""
        R = len(slices)
        order = sorted(range(R), key=lambda r: -len(slices[r]))  # longest first: the rows still going are a prefix
        s = state[:, :, order]  # (2, L, R, H)
        lengths = [len(slices[r]) for r in order]
        tops = []  # per step t: (n_t, H), the top h of the n_t rows that took a character
        for t in range(lengths[0] if R else 0):
            n = sum(1 for length in lengths if length > t)
            ids = np.array([slices[r][t] for r in order[:n]], dtype=np.int64)  # (n,)
            s = self.step(ids, s) if n == R else np.concatenate([self.step(ids, s[:, :, :n]), s[:, :, n:]], axis=2)
            if outputs:
                tops.append(s[0, -1, :n])
        at = {r: i for i, r in enumerate(order)}  # row -> its place in `order`
        new_state = s[:, :, [at[r] for r in range(R)]]  # (2, L, R, H), rows back in order
        if not outputs:
            return new_state, None
        return new_state, [np.stack([tops[t][at[r]] for t in range(len(slices[r]))]) if slices[r]
                           else np.zeros((0, self.hidden), dtype=np.float32) for r in range(R)]

    def block_seconds(self, rows: int, chars: int) -> float | None:
        """About how long `ingest` takes for `rows` slices of `chars` characters, from what the backend
        measured when it was built; None where it measured nothing (the scheduler then keeps every
        slice within one `prefill_chunk`)."""
        return None

    def prefill(self, ids: list[int], state: np.ndarray, outputs: bool = False):
        """One stream's prompt: `ingest` of a block of one row. ids: T ints; state (2, L, H) -> state
        (2, L, H), or (state, y (T, H)) with `outputs`."""
        new_state, ys = self.ingest([ids], state[:, :, None], outputs)
        # A copy made after the block's temporaries are freed fills their gap in the heap; sessions keep
        # these states for long, and the copy packs them tighter (14.9 against 17.0 KB a session, measured).
        final = new_state[:, :, 0].copy()
        return (final, ys[0]) if outputs else final

    def step(self, ids: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Advance every row by one character. ids (B,) int64; state (2, L, B, H) -> new state (2, L, B, H)."""
        return self.start_step(ids, state, background=False)()

    def start_step(self, ids: np.ndarray, state: np.ndarray, background: bool = True) -> Callable[[], np.ndarray]:
        """Begin a step; returns a function that waits for the new state (2, L, B, H).

        With `background`, every share of a large batch goes to the pool and the caller is free until it
        asks for the result (the engine updates each row's text meanwhile); without, the calling thread
        steps the first share itself. A batch too small to split is stepped at once either way; a batch
        under min_rows is padded, and no share holds more than max_rows rows. A backend whose step also
        yields the new state's logits (`_advance`) keeps them for the `logits` call that follows."""
        B = ids.shape[0]
        if B < self.min_rows:
            state, logits = self._advance(pad_rows(ids, self.min_rows), pad_rows(state, self.min_rows, axis=2))
            return self._joined([state[:, :, :B]], [None if logits is None else logits[:B]])
        shares = max(min(self.workers, B // MIN_ROWS_PER_WORKER), -(-B // self.max_rows))
        if shares <= 1:
            return self._joined(*zip(self._advance(ids, state)))
        bounds = [B * k // shares for k in range(shares + 1)]
        parts = list(zip(bounds[:-1], bounds[1:]))
        here = parts if self._pool is None else [] if background else [parts[0]]
        futures = [self._pool.submit(self._advance, ids[a:b], state[:, :, a:b]) for a, b in parts[len(here):]]
        done_here = [self._advance(ids[a:b], state[:, :, a:b]) for a, b in here]

        def wait() -> np.ndarray:  # rows back in order
            states, logits = zip(*done_here, *(f.result() for f in futures))
            return self._joined(states, logits)()

        return wait

    def _joined(self, states, logits) -> Callable[[], np.ndarray]:
        state = states[0] if len(states) == 1 else np.concatenate(states, axis=2)  # (2, L, B, H)
        if all(x is not None for x in logits):
            self._last = (state, logits[0] if len(logits) == 1 else np.concatenate(logits))
        return lambda: state

    def _advance(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(new state, its logits or None): `_step_rows` unless the backend's step yields both."""
        return self._step_rows(ids, state), None
