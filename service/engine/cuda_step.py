"""The fused step and per-row sampling for a whole batch on one device, replayed as CUDA graphs.

On a GPU a step of this model is a few dozen tiny kernels, and launching them from Python costs far
more than running them. So the whole step — head, sampling with every stream's own controls and random
numbers, the LSTM recurrence — is captured once per batch-size bucket as a CUDA graph and replayed;
a batch is padded up to its bucket (padding rows hold a zero state and neutral controls). Per step the
host sees one device-to-host copy: the sampled ids.

Graphs replay on fixed addresses, so the batch lives in buffers of a fixed capacity owned here
(`DeviceBatch`): streams join with `append` and leave with `filter`, between steps, as in TGI's `Batch`.

The same code runs eagerly on any device (graph capture only on CUDA), and on the CPU it picks exactly
the ids that `Runner` + `sampling.sample_next` pick for the same seeds (tests/test_cuda.py): the random
numbers are `sampling.uniforms` computed on the device in int64 arithmetic, bit for bit, and the
sampler is `sample_next` without its host-side branches (every filter runs on every row, a no-op where
the row's control is off).

Between two looks from the host the device may run several steps (`decode(k)`, the idea of vLLM's
multi-step scheduling): the ids of all k steps come back in one copy, so the host's per-row work is
paid once per k characters. A row that reaches its length limit inside those k steps freezes there
(its state, counter and penalties stop moving), so its state is exactly the one after its last
character, as if it had been stepped one at a time.

    step = CudaStep(runner.weights, device="cuda", capacity=256, max_steps=16)
    row = step.batch.append(state, params, seed, counter, seen_ids, remaining=200)   # (2, L, H) from prefill
    ids = step.decode(16)      # (16, n) int64 on the host: up to 16 characters per live row
    step.batch.filter(keep)    # rows that go on, in their new order
"""

from __future__ import annotations

import torch

from ..sampling import SamplingParams
from .runner import FusedWeights

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MAX_TOP = 5  # the most alternatives a row may ask for at each position (SamplingParams.top_logprobs)
UNLIMITED = 1 << 62  # a row's length limit when its caller gives none


def resolve_device(name: str) -> torch.device:
    """The `device` setting as a torch device: "cpu", "cuda" (refused without a GPU) or "auto"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device cuda: no CUDA GPU is available to torch {torch.__version__}; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of cpu, cuda, auto, got {name!r}")
    return torch.device(name)


def _int64(u: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN = _int64(0x9E3779B97F4A7C15)  # the constants of sampling.py's SplitMix64
_M1 = _int64(0xBF58476D1CE4E5B9)
_M2 = _int64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic: mask the sign's copies)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser in int64: multiplication wraps modulo 2**64 exactly as uint64 does."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def device_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """`sampling.uniforms` on the tensors' device. seeds, counters: (B,) int64 -> (B,) float64, same bits."""
    key = _mix64(seeds)
    z = _mix64(key + (counters + 1) * _GOLDEN)
    return _shr(z, 11).to(torch.float64) * (1.0 / 2**53)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                repetition_penalty: torch.Tensor, seen: torch.Tensor, u: torch.Tensor,
                presence_penalty: torch.Tensor | None = None, frequency_penalty: torch.Tensor | None = None,
                counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampling.sample_next` with no host synchronisation, so a CUDA graph can hold it.

    Same arguments (seen (B, V) bool is required; all False where no row is penalised; counts (B, V)
    float with both penalties, or none of the three) and the same picks: every row goes through the
    penalties, the sort and both filters, which leave a row whose controls are off exactly as it was.
    Returns (ids (B,) int64, logprobs (B,) under the raw logits)."""
    B, V = logits.shape
    raw = logits
    pen = repetition_penalty.unsqueeze(1)  # (B, 1)
    logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)  # (B, V)
    if counts is not None:  # x - 0 * c - 0 * [c > 0] is x bit for bit, so rows without these penalties keep their logits
        logits = logits - frequency_penalty.unsqueeze(1) * counts - presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    greedy = temperature <= 0  # (B,)
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)  # (B, V)
    filtered = ((top_k > 0) | (top_p < 1.0)).unsqueeze(1)  # (B, 1)
    ranks = torch.arange(V, device=logits.device).unsqueeze(0)  # (1, V)
    order = torch.where(filtered, torch.sort(scaled, dim=-1, descending=True, stable=True).indices, ranks)  # (B, V)
    ordered = scaled.gather(1, order)  # (B, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V)).unsqueeze(1)  # (B, 1)
    probs = torch.softmax(ordered.masked_fill(ranks >= k, float("-inf")), dim=-1)  # (B, V)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each rank
    probs = probs * ((before < top_p.unsqueeze(1)) | (ranks == 0) | ~filtered)  # (B, V)
    cdf = torch.cumsum(probs.double(), dim=-1)  # (B, V)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=V - 1)  # (B, 1)
    pick = torch.where(greedy, logits.argmax(dim=-1), order.gather(1, pick).squeeze(1))  # (B,)
    return pick, torch.log_softmax(raw, dim=-1).gather(1, pick.unsqueeze(1)).squeeze(1)


class DeviceBatch:
    """Every stream's state and controls on the device, rows [0, size) live, in fixed-capacity buffers.

    Padding rows hold a zero state, neutral controls and no characters left (`remaining` 0), so a step
    over a whole bucket leaves them as they are. `hist_*` hold the last `decode(k)`'s k steps."""

    @torch.inference_mode()
    def __init__(self, num_layers: int, hidden: int, vocab_size: int, capacity: int, device: torch.device,
                 max_steps: int = 1):
        self.capacity, self.device, self.size = capacity, device, 0
        self.state = torch.zeros(2, num_layers, capacity, hidden, device=device)  # (2, L, C, H)
        self.temperature = torch.ones(capacity, device=device)  # (C,)
        self.top_k = torch.zeros(capacity, dtype=torch.long, device=device)
        self.top_p = torch.ones(capacity, device=device)
        self.penalty = torch.ones(capacity, device=device)
        self.seen = torch.zeros(capacity, vocab_size, dtype=torch.bool, device=device)  # (C, V)
        self.seeds = torch.zeros(capacity, dtype=torch.long, device=device)
        self.counters = torch.zeros(capacity, dtype=torch.long, device=device)  # draws made so far
        self.presence = torch.zeros(capacity, device=device)  # (C,) OpenAI's presence penalty
        self.frequency = torch.zeros(capacity, device=device)  # (C,) and frequency penalty
        self.counts = torch.zeros(capacity, vocab_size, device=device)  # (C, V) times each row generated each character
        self.remaining = torch.zeros(capacity, dtype=torch.long, device=device)  # characters a row may still take; 0 freezes it
        top = min(MAX_TOP, vocab_size)
        self.hist_ids = torch.zeros(max_steps, capacity, dtype=torch.long, device=device)  # (K, C) picks of each step
        self.hist_lps = torch.zeros(max_steps, capacity, device=device)  # (K, C) their log-probabilities
        self.hist_top_ids = torch.zeros(max_steps, capacity, top, dtype=torch.long, device=device)  # (K, C, 5)
        self.hist_top_lps = torch.zeros(max_steps, capacity, top, device=device)  # (K, C, 5) most likely first
        self.ids, self.logprobs = self.hist_ids[0], self.hist_lps[0]  # a single step's picks

    @torch.inference_mode()
    def append(self, state: torch.Tensor, params: SamplingParams, seed: int, counter: int, seen_ids: list[int],
               remaining: int = UNLIMITED) -> int:
        """A stream joins as the last row: its state (2, L, H) after its prompt, its controls, its random
        stream (seed, counter), the characters its repetition penalty applies to and how many characters
        it may still generate (it freezes after the last). Returns the row."""
        if self.size == self.capacity:
            raise RuntimeError(f"the batch is full ({self.capacity} rows)")
        r = self.size
        self.state[:, :, r] = state.to(self.device)
        self.temperature[r], self.top_k[r], self.top_p[r] = params.temperature, params.top_k, params.top_p
        self.penalty[r], self.seeds[r], self.counters[r] = params.repetition_penalty, seed, counter
        self.presence[r], self.frequency[r], self.remaining[r] = params.presence_penalty, params.frequency_penalty, remaining
        self.seen[r] = False
        self.seen[r, torch.tensor(seen_ids, dtype=torch.long, device=self.device)] = True
        self.counts[r] = 0
        self.size += 1
        return r

    @torch.inference_mode()
    def filter(self, keep: list[int]) -> None:
        """Keep these rows, in this order, as rows 0..len(keep)-1; the rest become padding."""
        n, old = len(keep), self.size
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for buf in (self.temperature, self.top_k, self.top_p, self.penalty, self.seeds, self.counters, self.presence,
                    self.frequency, self.remaining, self.ids, self.logprobs):
            buf[:n] = buf[idx]
        self.seen[:n] = self.seen[idx]
        self.counts[:n] = self.counts[idx]
        self.state[:, :, :n] = self.state[:, :, idx]
        self._neutral(n, max(n, old))
        self.size = n

    @torch.inference_mode()
    def row_state(self, row: int) -> torch.Tensor:
        """A copy of one row's state on the host (2, L, H), e.g. for its session when the call completes."""
        return self.state[:, :, row].to("cpu", copy=True)

    def row_counter(self, row: int) -> int:
        return int(self.counters[row])

    def _neutral(self, start: int, end: int) -> None:
        self.state[:, :, start:end] = 0
        self.temperature[start:end], self.top_k[start:end], self.top_p[start:end] = 1.0, 0, 1.0
        self.penalty[start:end], self.seeds[start:end], self.counters[start:end] = 1.0, 0, 0
        self.presence[start:end], self.frequency[start:end], self.remaining[start:end] = 0.0, 0.0, 0
        self.seen[start:end] = False
        self.counts[start:end] = 0


class CudaStep:
    """Steps of every live row: logits, sampling, the LSTM recurrence; graphs on CUDA, eager elsewhere.

    weights: `Runner(...).weights` (fp32; moved to `device`). capacity: the most rows at once.
    max_steps: the most steps one `decode` runs (graphs are captured for 1 and for max_steps).
    buckets: batch sizes a graph is captured for (capacity is always one); a batch runs in the smallest
    bucket that holds it. graphs: capture and replay (default: on CUDA only). pad: run padded to the
    bucket (default: when graphs are on; on the CPU, padding only tests the graph path's shapes)."""

    @torch.inference_mode()
    def __init__(self, weights: FusedWeights, device: str | torch.device = "cuda", capacity: int = 256,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, graphs: bool | None = None, pad: bool | None = None,
                 max_steps: int = 1):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        move = lambda t: t.detach().to(self.device, torch.float32).contiguous()  # noqa: E731
        self.table0, self.w_hh0, self.w_head, self.b_head = (move(weights.table0), move(weights.w_hh0),
                                                             move(weights.w_head), move(weights.b_head))
        self.w_cat, self.b_cat = [move(w) for w in weights.w_cat], [move(b) for b in weights.b_cat]
        self.num_layers, self.hidden = 1 + len(self.w_cat), self.w_hh0.shape[0]
        self.buckets = sorted({b for b in buckets if b < capacity} | {capacity})
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.max_steps = max_steps
        self.step_counts = sorted({1, max_steps})  # the k a graph is captured for
        self.batch = DeviceBatch(self.num_layers, self.hidden, self.table0.shape[0], capacity, self.device, max_steps)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.pad = self.graphs if pad is None else pad
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if self.graphs:
            self._capture_all()

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds `rows`."""
        return next(b for b in self.buckets if b >= rows)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One step: the ids (size,) int64 on the host; `batch.logprobs[:size]` their log-probabilities."""
        return self.decode(1)[0]

    @torch.inference_mode()
    def decode(self, k: int) -> torch.Tensor:
        """Run k steps (1 or max_steps): each live row samples a character from its state, then advances
        by it, unless it has no characters left. Returns the ids (k, size) int64 on the host, the call's
        one device-to-host copy; a row's ids past its limit mean nothing. Counters, penalty masks and
        counts advance on the device; `batch.hist_lps` and `batch.hist_top_*` hold the steps' figures."""
        n = self.batch.size
        if k not in self.step_counts:
            raise ValueError(f"decode runs {' or '.join(map(str, self.step_counts))} steps, not {k}")
        if n == 0:
            return torch.zeros(k, 0, dtype=torch.long)
        rows = self.bucket(n) if self.pad else n
        if self.graphs:
            self._graphs[rows, k].replay()
        else:
            self._steps(rows, k)
        return self.batch.hist_ids[:k, :n].to("cpu", copy=True)

    def _steps(self, rows: int, k: int) -> None:
        for j in range(k):
            self._step_rows(rows, j)

    def _step_rows(self, rows: int, j: int) -> None:
        """Step j of a decode over batch rows [0, rows), in place. Kernels only: no host synchronisation."""
        bt, H = self.batch, self.hidden
        state = bt.state[:, :, :rows]  # (2, L, R, H), a view of the fixed buffer
        active = bt.remaining[:rows] > 0  # (R,) rows that still take a character
        logits = torch.addmm(self.b_head, state[0, -1], self.w_head)  # (R, V)
        u = device_uniforms(bt.seeds[:rows], bt.counters[:rows])  # (R,) float64
        ids, lps = sample_rows(logits, bt.temperature[:rows], bt.top_k[:rows], bt.top_p[:rows], bt.penalty[:rows],
                               bt.seen[:rows], u, bt.presence[:rows], bt.frequency[:rows], bt.counts[:rows])  # (R,), (R,)
        bt.hist_ids[j, :rows].copy_(ids)
        bt.hist_lps[j, :rows].copy_(lps)
        top_lps, top_ids = torch.log_softmax(logits, dim=-1).topk(bt.hist_top_ids.shape[2], dim=-1)  # (R, 5) each
        bt.hist_top_ids[j, :rows].copy_(top_ids)
        bt.hist_top_lps[j, :rows].copy_(top_lps)
        taken = active.long()  # (R,)
        bt.counters[:rows] += taken
        bt.remaining[:rows] -= taken
        pick = ids.unsqueeze(1)  # (R, 1)
        seen = bt.seen[:rows]
        seen.scatter_(1, pick, seen.gather(1, pick) | active.unsqueeze(1))  # a frozen row's mask stays as it was
        bt.counts[:rows].scatter_add_(1, pick, active.unsqueeze(1).to(bt.counts.dtype))
        keep = active.unsqueeze(1)  # (R, 1)
        for layer in range(self.num_layers):  # layer l reads its own old h before writing it
            if layer == 0:
                gates = torch.addmm(self.table0.index_select(0, ids), state[0, 0], self.w_hh0)  # (R, 4H)
            else:
                inp = torch.cat([state[0, layer - 1], state[0, layer]], dim=1)  # (R, 2H): [new h_below, old h_self]
                gates = torch.addmm(self.b_cat[layer - 1], inp, self.w_cat[layer - 1])  # (R, 4H)
            ifo = torch.sigmoid(gates[:, : 3 * H])  # (R, 3H): input, forget, output gates
            g = torch.tanh(gates[:, 3 * H :])  # (R, H)
            c = torch.mul(ifo[:, H : 2 * H], state[1, layer]).addcmul_(ifo[:, :H], g)  # f * c_prev + i * g
            h = torch.mul(ifo[:, 2 * H :], torch.tanh(c))  # h = o * tanh(c)
            state[1, layer].copy_(torch.where(keep, c, state[1, layer]))  # a frozen row keeps its state
            state[0, layer].copy_(torch.where(keep, h, state[0, layer]))

    def _capture_all(self) -> None:
        """One graph per bucket and step count, captured while the batch is empty (warm-up steps only touch padding)."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for rows in self.buckets:
                for _ in range(2):  # warm-up: lazy initialisation and workspace allocation happen outside capture
                    self._step_rows(rows, 0)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for k in reversed(self.step_counts):
            for rows in reversed(self.buckets):  # the largest first: smaller graphs reuse its pool memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._steps(rows, k)
                self._graphs[rows, k] = graph
        torch.cuda.synchronize(self.device)
        self.batch._neutral(0, self.batch.capacity)
