"""Inference arithmetic for the engine: prompt ingestion and a fused single-character step.

The step is the LSTM recurrence written out with one matrix multiply per layer over the
concatenated [input, hidden] vector; layer 0's input projection is folded into the embedding, so
that layer costs a row lookup plus one multiply by the recurrent weights. It computes what
`nn.LSTM` computes (tested to float tolerance) with fewer, larger kernels.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..model import CharLSTM
from .quant import Int8Linear

log = logging.getLogger("charlstm.engine")

SHORT_PROMPT = 8  # characters; up to this, stepping beats one nn.LSTM call (measured on 2 x 512)
MIN_ROWS_PER_WORKER = 16  # below this, a share of the batch costs more per row than it saves (measured on 2 x 512)
# A row's numbers must not depend on how many rows share its matrix multiplies, or one seed would write
# another text alone than in a batch. BLAS picks its kernel by the number of rows and the kernels round
# differently, and which sizes share a kernel depends on the CPU: MKL (2024.2) on an AVX-512 Xeon gives
# one row alone other bits than 2 to 160 rows, and those other bits than 192 and more; on an AVX2 EPYC,
# 1 to 3 rows round one way and 4 to 259 another. So the runner measures it when it is built
# (`row_bounds`): every fp32 multiply then sees between `min_rows` and `max_rows` rows (a smaller batch is
# padded with copies of its first row, a larger one is cut into shares). tests/test_runner.py pins it.
MIN_ROWS_PER_CALL = 2  # the GPU step's (cuda_step.py): a lone row runs as two
ROW_PROBES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)  # batch sizes row_bounds tries
MIN_SHARE = 64  # row_bounds wants one rounding from min_rows to at least this many rows


@functools.lru_cache(maxsize=None)
def row_bounds(shapes: tuple[tuple[int, int], ...], threads: int) -> tuple[int, int]:
    """(min_rows, max_rows): the range of batch sizes over which every row of an fp32 addmm by matrices of
    these (K, N) shapes gets the same bits, measured here on random numbers (the kernel is chosen by shape
    and by torch's thread count, not by value; `threads` keys the cache). The smallest min_rows whose range reaches MIN_SHARE wins; (1, 256) with a warning
    when none does (rows may then round differently alone and in a batch)."""
    gen = torch.Generator().manual_seed(0)
    agree = [True] * (len(ROW_PROBES) - 1)  # agree[i]: sizes ROW_PROBES[i] and [i + 1] give their common rows alike
    for K, N in shapes:
        w, b = torch.rand(K, N, generator=gen) - 0.5, torch.rand(N, generator=gen) - 0.5
        x = torch.rand(ROW_PROBES[-1], K, generator=gen) - 0.5
        before = torch.addmm(b, x[: ROW_PROBES[0]], w)  # (B, N); two at a time, so the probe leaves no large heap behind
        for i, B in enumerate(ROW_PROBES[1:]):
            out = torch.addmm(b, x[:B], w)
            agree[i] = agree[i] and torch.equal(out[: before.shape[0]], before)
            before = out
    for i, lo in enumerate(ROW_PROBES[:8]):
        hi = lo
        for j in range(i, len(agree)):
            if not agree[j]:
                break
            hi = ROW_PROBES[j + 1]
        if hi >= MIN_SHARE:
            return lo, hi
    log.warning("no batch-size range rounds every row alike for shapes %s: a seed may write another text alone than in a batch", shapes)
    return 1, ROW_PROBES[-1]


QUANTIZE_MODES = ("none", "int8")

# A stream's recurrent state in the engine: (2, L, H) = (h, c) x layers x hidden, or batched (2, L, B, H).


@dataclass(frozen=True)
class FusedWeights:
    """The fused step's fp32 weights, gate columns in [i, f, o, g] order; what every step implementation
    (this runner, int8, service/engine/cuda_step.py) computes from."""

    table0: torch.Tensor  # (V, 4H): embedding @ w_ih0 + both layer-0 biases
    w_hh0: torch.Tensor  # (H, 4H)
    w_cat: list[torch.Tensor]  # layers >= 1: (2H, 4H) over [h_below, h_self]
    b_cat: list[torch.Tensor]  # (4H,)
    w_head: torch.Tensor  # (H, V)
    b_head: torch.Tensor  # (V,)

    @classmethod
    @torch.inference_mode()
    def from_model(cls, model: CharLSTM) -> "FusedWeights":
        lstm, H = model.lstm, model.config.hidden_size
        # Gate columns go from nn.LSTM's [i, f, g, o] to [i, f, o, g]: one sigmoid covers the first 3H, one tanh the last H.
        order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])  # (4H,)
        w_ih0, w_hh0 = lstm.weight_ih_l0[order], lstm.weight_hh_l0[order]  # (4H, E), (4H, H)
        bias0 = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[order]  # (4H,)
        w_cat, b_cat = [], []
        for layer in range(1, model.config.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
            w_cat.append(torch.cat([w_ih, w_hh], dim=1)[order].T.contiguous())
            bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
            b_cat.append(bias[order].contiguous())
        return cls(table0=(model.embed.weight @ w_ih0.T + bias0).contiguous(), w_hh0=w_hh0.T.contiguous(),
                   w_cat=w_cat, b_cat=b_cat, w_head=model.head.weight.T.contiguous(), b_head=model.head.bias.detach().clone())


@dataclass(frozen=True)
class _Int8Step:
    """The step's large matrices in int8 (service/engine/quant.py); the gather table and the head stay fp32."""

    hh0: Int8Linear  # h0 -> (B, 4H), no bias: the table row carries it
    cat: list[Int8Linear]  # layers >= 1: [h_below, h_self] -> (B, 4H) + bias


class Runner:
    """The fused step, optionally split by rows over `workers` threads.

    LSTM rows are independent within a step, so a large batch can be cut into contiguous shares that
    threads step at the same time, with one join per step. On two cores this beats two OpenMP threads
    inside each kernel, which meet at a barrier after every kernel (17 per step for two layers) and
    stall whenever the event loop takes one of the cores (see benchmarks/README.md)."""

    def __init__(self, model: CharLSTM, workers: int = 1, quantize: str = "none", device: str | torch.device = "cpu"):
        """quantize: "none" (fp32) or "int8": the step's recurrent and upper-layer matrices in int8
        (service/engine/quant.py). The embedding-folded table stays fp32 (a lookup), the head too (65
        columns: the int8 kernel's fixed cost there exceeds fp32's whole multiply, measured at B = 1 and
        64), and so does `prefill` (nn.LSTM in fp32 ingests faster than the int8 step; benchmarks/README.md).
        device: where the weights and every state this runner makes live; a model on another device is
        copied there (the caller's model stays where it is). int8 is a CPU kernel."""
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        self.device = torch.device(device)
        if quantize != "none" and self.device.type != "cpu":
            raise ValueError(f"quantize {quantize} runs on the CPU only, not on {self.device.type}")
        model.eval()
        if next(model.parameters()).device != self.device:
            model = copy.deepcopy(model).to(self.device)
        self.model = model
        cfg = model.config
        self.num_layers, self.hidden, self.vocab_size = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
        self.quantize = quantize
        self.weights = FusedWeights.from_model(model)
        w = self.weights
        self.table0, self.w_hh0, self.w_cat, self.b_cat, self.w_head, self.b_head = (
            w.table0, w.w_hh0, w.w_cat, w.b_cat, w.w_head, w.b_head)
        self._int8 = None
        if quantize == "int8":
            self._int8 = _Int8Step(hh0=Int8Linear(w.w_hh0), cat=[Int8Linear(wc, bc) for wc, bc in zip(w.w_cat, w.b_cat)])
        shapes = (tuple(w.w_hh0.shape), *(tuple(m.shape) for m in w.w_cat), tuple(w.w_head.shape))
        self.min_rows, self.max_rows = row_bounds(shapes, torch.get_num_threads()) if self.device.type == "cpu" else (MIN_ROWS_PER_CALL, 1 << 30)
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="charlstm-step") if self.workers > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def zero_state(self, batch: int | None = None) -> torch.Tensor:
        shape = (2, self.num_layers, self.hidden) if batch is None else (2, self.num_layers, batch, self.hidden)
        return torch.zeros(shape, device=self.device)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """Next-character logits from a batched state (2, L, B, H) -> (B, V): the head over the top h.
        Every multiply sees min_rows to max_rows rows, so a row gets the bits it gets in any batch."""
        top = state[0, -1]  # (B, H)
        B = top.shape[0]
        if B < self.min_rows:
            return torch.addmm(self.b_head, _pad_rows(top, self.min_rows), self.w_head)[:B]
        if B > self.max_rows:
            return torch.cat([self.logits(state[:, :, a : a + self.max_rows]) for a in range(0, B, self.max_rows)])
        return torch.addmm(self.b_head, top, self.w_head)

    @torch.inference_mode()
    def prefill(self, ids: list[int], state: torch.Tensor, outputs: bool = False):
        """Feed a whole prompt in one LSTM call. ids: T ints; state (2, L, H) -> state (2, L, H).
        A prompt of a few characters goes through the fused step instead, which costs less per call.
        With `outputs`, returns (state, y): y (T, H) is the top layer's output after each character,
        what the head turns into the prediction of the next one (prompt log-probabilities).
        A state from elsewhere (a session on the host) moves to this runner's device first."""
        state = state.to(self.device)
        if len(ids) <= SHORT_PROMPT:
            s = state.unsqueeze(2)  # (2, L, 1, H)
            tops = []
            for i in ids:
                s = self.step(torch.tensor([i], device=self.device), s)
                if outputs:
                    tops.append(s[0, -1])  # (1, H)
            # A copy made after the step's temporaries are freed fills their gap in the heap; sessions keep
            # these states for long, and the copy packs them tighter (14.9 against 17.0 KB a session, measured).
            final = s[:, :, 0].clone()
            if not outputs:
                return final
            return final, torch.cat(tops) if tops else state.new_zeros(0, self.hidden)  # (T, H)
        x = self.model.embed(torch.tensor(ids, dtype=torch.long, device=self.device).unsqueeze(0))  # (1, T, E)
        h0, c0 = state[0].unsqueeze(1).contiguous(), state[1].unsqueeze(1).contiguous()  # (L, 1, H)
        y, (h, c) = self.model.lstm(x, (h0, c0))  # y (1, T, H); h, c (L, 1, H) each
        final = torch.stack([h[:, 0], c[:, 0]])  # (2, L, H)
        return (final, y[0]) if outputs else final

    def step(self, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Advance every row by one character. ids (B,) int64; state (2, L, B, H) -> new state (2, L, B, H).

        No autograd bookkeeping: the fused weights were built without gradients (and the engine's
        thread runs under inference mode, which a per-call decorator would re-enter every step)."""
        return self.start_step(ids, state, background=False)()

    def start_step(self, ids: torch.Tensor, state: torch.Tensor, background: bool = True) -> Callable[[], torch.Tensor]:
        """Begin a step; returns a function that waits for the new state (2, L, B, H).

        With `background`, every share of a large batch goes to the pool and the caller is free until it
        asks for the result (the engine updates each row's text meanwhile); without, the calling thread
        steps the first share itself. A batch too small to split is stepped at once either way; one row
        is padded to min_rows, and no share holds more than max_rows rows (row_bounds)."""
        B = ids.shape[0]
        if B < self.min_rows and self._int8 is None:  # int8 products are exact integers, the same bits at any batch size
            padded = self._step_rows(_pad_rows(ids, self.min_rows), _pad_rows(state, self.min_rows, dim=2))  # (2, L, min_rows, H)
            return lambda: padded[:, :, :B]
        shares = max(min(self.workers, B // MIN_ROWS_PER_WORKER), -(-B // self.max_rows))
        if shares <= 1:
            new_state = self._step_rows(ids, state)
            return lambda: new_state
        bounds = [B * k // shares for k in range(shares + 1)]
        parts = list(zip(bounds[:-1], bounds[1:]))
        here = parts if self._pool is None else [] if background else [parts[0]]
        futures = [self._pool.submit(self._step_share, ids[a:b], state[:, :, a:b]) for a, b in parts[len(here):]]
        done_here = [self._step_rows(ids[a:b], state[:, :, a:b]) for a, b in here]
        return lambda: torch.cat([*done_here, *(f.result() for f in futures)], dim=2)  # rows back in order

    def _step_share(self, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: a pool thread enters it for itself
            return self._step_rows(ids, state)

    def _step_rows(self, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Seven kernels per layer after its input (gather or cat), written straight into the new state: every call costs Python and a
        GIL hand-off, which at small batches is most of the step and at large ones slows the other shares."""
        H = self.hidden
        h_all, c_all = state[0], state[1]  # (L, B, H)
        out = state.new_empty(state.shape)  # (2, L, B, H), contiguous
        for layer in range(self.num_layers):
            if self._int8 is not None:  # int8 weights, fp32 gates
                if layer == 0:
                    gates = self._int8.hh0(h_all[0]).add_(self.table0.index_select(0, ids))  # (B, 4H)
                else:
                    gates = self._int8.cat[layer - 1](out[0, layer - 1], h_all[layer])  # (B, 4H) over [h_below, h_self]
            elif layer == 0:
                gates = torch.addmm(self.table0.index_select(0, ids), h_all[0], self.w_hh0)  # (B, 4H)
            else:
                inp = torch.cat([out[0, layer - 1], h_all[layer]], dim=1)  # (B, 2H): [h_below, h_self]
                gates = torch.addmm(self.b_cat[layer - 1], inp, self.w_cat[layer - 1])  # (B, 4H)
            ifo = torch.sigmoid(gates[:, : 3 * H])  # (B, 3H): input, forget, output gates
            g = torch.tanh(gates[:, 3 * H :])  # (B, H)
            c = torch.mul(ifo[:, H : 2 * H], c_all[layer], out=out[1, layer])  # f * c_prev
            c.addcmul_(ifo[:, :H], g)  # + i * g
            torch.mul(ifo[:, 2 * H :], torch.tanh(c), out=out[0, layer])  # h = o * tanh(c)
        return out


def _pad_rows(x: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """x with copies of its first row appended along `dim` until it has `rows` rows (contiguous)."""
    first = x.narrow(dim, 0, 1)
    shape = list(x.shape)
    shape[dim] = rows - x.shape[dim]
    return torch.cat([x, first.expand(*shape)], dim=dim)
