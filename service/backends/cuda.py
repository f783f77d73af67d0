"""The fused step and per-row sampling for a whole batch on one device, replayed as CUDA graphs.

On a GPU a step of this model is a few dozen tiny kernels, and launching them from Python costs far
more than running them. So the whole step — head, sampling with every stream's own controls and random
numbers, the LSTM recurrence — is captured once per batch-size bucket as a CUDA graph and replayed;
a batch is padded up to its bucket (padding rows hold a zero state and neutral controls).

Between two looks from the host the device runs k steps (`decode(k)`, the idea of vLLM's multi-step
scheduling): the ids of all k steps come back in one copy, so the host's per-row work is paid once
per k characters. The state lives in a ring of k + 1 slots: step j reads slot j and writes slot j + 1,
so the state of a row after each of the k characters is still there when the host looks, and a row
that ended inside the k steps (its length, a stop string) hands back exactly the state after its last
character; the steps it took beyond its end are ignored. Graphs replay on fixed addresses, so the
batch lives in buffers of a fixed capacity owned here (`DeviceBatch`): streams join with `append` and
leave with `filter`, between looks, as in TGI's `Batch`.

Two variants of the step are captured: a lean one (temperature, greedy and each row's logit bias) and
a full one (top-k, top-p, min-p, repetition, presence and frequency penalties too); a batch takes the
full one only while some row asks for one of those. Both pick the same character for a row whose
controls are off. Constrained output is not served here: its automaton must see each character before
the next is drawn, and a look draws k of them on the device.

The random numbers and the samplers are the host's own (`sampling.uniforms_from_keys`, `sample_next`
with `branch_free`, `sample_plain`), written over the array API and run here on torch tensors: one
definition for the host and the device. The same code runs eagerly on any device (graph capture only
on CUDA), and on the CPU it picks exactly the ids the host path picks for the same seeds
(tests/unit/test_cuda.py, tests/unit/test_device_engine.py, and the backend contract through the engine).

    step = CudaStep(backend.weights, device="cuda", capacity=256, max_steps=16)
    row = step.batch.append(state, params, seed, counter, seen_ids)   # (2, L, H) from prefill
    ids = step.decode(16)      # (16, n) int64 on the host: 16 characters per live row
    state = step.batch.row_state(row, after=5)   # (2, L, H) on the host, after the row's 5th character
    step.batch.filter(keep)    # rows that go on, in their new order
"""

from __future__ import annotations

import numpy as np
import torch

from ..sampling import SamplingParams, sample_next, sample_plain, stream_key, uniforms_from_keys
from .base import DeviceLook
from .fused import FusedWeights
from .torch_fp32 import TorchBackend

# No bucket of one row: BLAS multiplies a lone row with another kernel (a matrix-vector product) that
# rounds differently, and a seed must write the same text alone as in a batch.
MIN_ROWS_PER_CALL = 2  # a lone row runs as two
DEFAULT_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MAX_TOP = 5  # the most alternatives a row may ask for at each position (SamplingParams.top_logprobs)


def resolve_device(name: str) -> torch.device:
    """The `device` setting as a torch device: "cpu", "cuda" (refused without a GPU) or "auto"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device cuda: no CUDA GPU is available to torch {torch.__version__}; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of cpu, cuda, auto, got {name!r}")
    return torch.device(name)


class DeviceBatch:
    """Every stream's state and controls on the device, rows [0, size) live, in fixed-capacity buffers.

    `state` is slot 0 of the ring, the state between looks. Padding rows hold a zero state and neutral
    controls. `hist_*` and ring slots 1..k hold the last `decode(k)`'s k steps (ids, their
    log-probabilities, the logits, the states) in the row order of that decode: read them before the
    next `append` or `filter`, which only move slot 0 and the controls."""

    @torch.inference_mode()
    def __init__(self, num_layers: int, hidden: int, vocab_size: int, capacity: int, device: torch.device,
                 max_steps: int = 1):
        self.capacity, self.device, self.size = capacity, device, 0
        self.ring = torch.zeros(max_steps + 1, 2, num_layers, capacity, hidden, device=device)  # (K+1, 2, L, C, H)
        self.state = self.ring[0]  # (2, L, C, H)
        self.temperature = torch.ones(capacity, device=device)  # (C,)
        self.scale = torch.ones(capacity, device=device)  # (C,) the temperature, 1 for greedy rows
        self.greedy = torch.zeros(capacity, dtype=torch.bool, device=device)  # (C,)
        self.top_k = torch.zeros(capacity, dtype=torch.long, device=device)  # (C,) 0: off
        self.top_p = torch.ones(capacity, device=device)  # (C,) 1: off
        self.min_p = torch.zeros(capacity, device=device)  # (C,) 0: off
        self.penalty = torch.ones(capacity, device=device)  # (C,) repetition penalty, 1: off
        self.presence = torch.zeros(capacity, device=device)  # (C,) OpenAI's presence penalty
        self.frequency = torch.zeros(capacity, device=device)  # (C,) and frequency penalty
        self.seen = torch.zeros(capacity, vocab_size, dtype=torch.bool, device=device)  # (C, V)
        self.bias = torch.zeros(capacity, vocab_size, device=device)  # (C, V) each row's logit bias (OpenAI's logit_bias)
        self.counts = torch.zeros(capacity, vocab_size, device=device)  # (C, V) times each row generated each character
        self.seeds = torch.zeros(capacity, dtype=torch.long, device=device)  # (C,)
        self.keys = torch.zeros(capacity, dtype=torch.long, device=device)  # (C,) each seed hashed once
        self.counters = torch.zeros(capacity, dtype=torch.long, device=device)  # (C,) draws made so far
        self.hist_ids = torch.zeros(max_steps, capacity, dtype=torch.long, device=device)  # (K, C) picks of each step
        self.hist_lps = torch.zeros(max_steps, capacity, device=device)  # (K, C) their log-probabilities
        self.hist_logits = torch.zeros(max_steps, capacity, vocab_size, device=device)  # (K, C, V), for alternatives
        self.ids, self.logprobs = self.hist_ids[0], self.hist_lps[0]  # a single step's picks

    @torch.inference_mode()
    def append(self, state: np.ndarray, params: SamplingParams, seed: int, counter: int, seen_ids: list[int],
               bias: np.ndarray | None = None) -> int:
        """A stream joins as the last row: its state (2, L, H) float32 after its prompt, its controls, its random
        stream (seed, counter), the characters its repetition penalty applies to and its logit bias, (V,) float32
        (the host batch's row of it; None: none). Returns the row."""
        if self.size == self.capacity:
            raise RuntimeError(f"the batch is full ({self.capacity} rows)")
        r = self.size
        self.state[:, :, r] = torch.from_numpy(state).to(self.device)
        greedy = params.greedy
        self.temperature[r], self.scale[r], self.greedy[r] = params.temperature, 1.0 if greedy else params.temperature, greedy
        self.top_k[r], self.top_p[r], self.penalty[r] = params.top_k, params.top_p, params.repetition_penalty
        self.min_p[r] = params.min_p
        self.presence[r], self.frequency[r] = params.presence_penalty, params.frequency_penalty
        self.seeds[r], self.keys[r], self.counters[r] = seed, stream_key(seed), counter
        self.seen[r] = False
        self.seen[r, torch.tensor(seen_ids, dtype=torch.long, device=self.device)] = True
        self.counts[r] = 0
        self.bias[r] = 0.0 if bias is None else torch.from_numpy(bias).to(self.device)
        self.size += 1
        return r

    @torch.inference_mode()
    def filter(self, keep: list[int]) -> None:
        """Keep these rows, in this order, as rows 0..len(keep)-1; the rest become padding."""
        n, old = len(keep), self.size
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for buf in (self.temperature, self.scale, self.greedy, self.top_k, self.top_p, self.min_p, self.penalty, self.presence,
                    self.frequency, self.seeds, self.keys, self.counters):
            buf[:n] = buf[idx]
        self.seen[:n] = self.seen[idx]
        self.counts[:n] = self.counts[idx]
        self.bias[:n] = self.bias[idx]
        self.state[:, :, :n] = self.state[:, :, idx]
        self._neutral(n, max(n, old))
        self.size = n

    @torch.inference_mode()
    def row_state(self, row: int, after: int | None = None) -> np.ndarray:
        """A copy of one row's state on the host (2, L, H) float32, e.g. for its session when the call
        completes: now, or after its `after`-th character of the last decode (1..k)."""
        return self.ring[after or 0, :, :, row].to("cpu", copy=True).numpy()

    def row_counter(self, row: int) -> int:
        """Draws the row's random stream has made (a session's position in it)."""
        return int(self.counters[row])

    def _neutral(self, start: int, end: int) -> None:
        self.state[:, :, start:end] = 0
        self.temperature[start:end], self.scale[start:end], self.greedy[start:end] = 1.0, 1.0, False
        self.top_k[start:end], self.top_p[start:end], self.penalty[start:end] = 0, 1.0, 1.0
        self.min_p[start:end] = 0.0
        self.presence[start:end], self.frequency[start:end] = 0.0, 0.0
        self.seeds[start:end], self.keys[start:end], self.counters[start:end] = 0, 0, 0
        self.seen[start:end] = False
        self.counts[start:end] = 0
        self.bias[start:end] = 0.0


class CudaStep:
    """Steps of every live row: logits, sampling, the LSTM recurrence; graphs on CUDA, eager elsewhere. It is
    the CUDA backend's `Decoder` (base.py): the engine joins, keeps and looks at its rows through that.

    weights: `TorchBackend(...).weights` (fp32; moved to `device`). capacity: the most rows at once.
    max_steps: the most steps one `decode` runs (graphs are captured for 1 and for max_steps).
    buckets: batch sizes a graph is captured for (capacity is always one, one row never); a batch runs in the smallest
    bucket that holds it. graphs: capture and replay (default: on CUDA only). pad: run padded to the
    bucket (default: when graphs are on; on the CPU, padding only tests the graph path's shapes)."""

    @torch.inference_mode()
    def __init__(self, weights: FusedWeights, device: str | torch.device = "cuda", capacity: int = 256,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, graphs: bool | None = None, pad: bool | None = None,
                 max_steps: int = 1):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        move = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, torch.float32)  # noqa: E731
        self.table0, self.w_hh0, self.w_head, self.b_head = (move(weights.table0), move(weights.w_hh0),
                                                             move(weights.w_head), move(weights.b_head))
        self.w_cat, self.b_cat = [move(w) for w in weights.w_cat], [move(b) for b in weights.b_cat]
        self.num_layers, self.hidden = 1 + len(self.w_cat), self.w_hh0.shape[0]
        smallest = min(MIN_ROWS_PER_CALL, capacity)  # a lone row runs as two, as on the host
        self.buckets = sorted({b for b in buckets if smallest <= b < capacity} | {capacity})
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.max_steps = max_steps
        self.step_counts = sorted({1, max_steps})  # the k a graph is captured for
        self.batch = DeviceBatch(self.num_layers, self.hidden, self.table0.shape[0], capacity, self.device, max_steps)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.pad = self.graphs if pad is None else pad
        if self.graphs and not self.pad:
            raise ValueError("graphs replay at bucket sizes: graphs=True needs pad=True")
        self._graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        if self.graphs:
            self._capture_all()

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds `rows`."""
        return next(b for b in self.buckets if b >= rows)

    # --- the Decoder interface (base.py) -------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.batch.capacity

    @property
    def size(self) -> int:
        return self.batch.size

    def join(self, state: np.ndarray, params: SamplingParams, seed: int, counter: int, seen_ids: list[int],
             bias: np.ndarray | None = None) -> int:
        return self.batch.append(state, params, seed, counter, seen_ids, bias)

    def keep(self, rows: list[int]) -> None:
        self.batch.filter(rows)

    def look(self, k: int, full: bool, logprobs: bool, top: int) -> DeviceLook:
        """k steps; the ids come back in one copy, the figures only when some row asks for them."""
        n = self.batch.size
        ids = self.decode(k, full).T.tolist()  # n rows of k ids
        lps = self.batch.hist_lps[:k, :n].T.tolist() if logprobs else None
        tops = tuple(t.transpose(0, 1).tolist() for t in self.alternatives(k, n, top)) if top else None  # (n, k, top) each
        return DeviceLook(ids, lps, tops)

    def row_state(self, row: int, after: int | None = None) -> np.ndarray:
        return self.batch.row_state(row, after)

    @torch.inference_mode()
    def step(self, full: bool = True) -> torch.Tensor:
        """One step: the ids (size,) int64 on the host; `batch.logprobs[:size]` their log-probabilities."""
        return self.decode(1, full)[0]

    @torch.inference_mode()
    def decode(self, k: int, full: bool = True) -> torch.Tensor:
        """Run k steps (1 or max_steps): each live row samples a character from its state, then advances
        by it. Returns the ids (k, size) int64 on the host, the call's one device-to-host copy.
        full: the sampler with filters and penalties; False (lean) only when no live row has one.
        Counters, penalty masks and counts advance on the device; `batch.hist_lps` holds the picks'
        log-probabilities, `batch.hist_logits` the logits they were drawn from, ring slot j + 1 the
        state after step j."""
        n = self.batch.size
        if k not in self.step_counts:
            raise ValueError(f"decode runs {' or '.join(map(str, self.step_counts))} steps, not {k}")
        if n == 0:
            return torch.zeros(k, 0, dtype=torch.long)
        rows = self.bucket(n) if self.pad else max(n, min(MIN_ROWS_PER_CALL, self.batch.capacity))  # a padding row is neutral
        if self.graphs:
            self._graphs[rows, k, full].replay()
        else:
            self._steps(rows, k, full)
        return self.batch.hist_ids[:k, :n].to("cpu", copy=True)

    @torch.inference_mode()
    def alternatives(self, k: int, n: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `top` most likely characters at each of the last decode's k steps for rows [0, n) and their
        log-probabilities under the model's own distribution, on the host: (k, n, top) each."""
        lps, ids = torch.log_softmax(self.batch.hist_logits[:k, :n], dim=-1).topk(top, dim=-1)  # (k, n, top)
        return ids.cpu(), lps.cpu()

    def _steps(self, rows: int, k: int, full: bool) -> None:
        """k steps over batch rows [0, rows), reading ring slot 0 and leaving the result there too."""
        bt = self.batch
        draws = bt.counters[:rows].unsqueeze(0) + torch.arange(k, device=self.device).unsqueeze(1)  # (k, R)
        u = uniforms_from_keys(bt.keys[:rows].unsqueeze(0), draws)  # (k, R) float64: every draw of the look at once
        for j in range(k):
            self._step_rows(rows, j, u[j], full)
        bt.counters[:rows] += k
        bt.ring[0, :, :, :rows].copy_(bt.ring[k, :, :, :rows])

    def _step_rows(self, rows: int, j: int, u: torch.Tensor, full: bool) -> None:
        """Step j: read ring slot j, write slot j + 1. Kernels only: no host synchronisation."""
        bt, H = self.batch, self.hidden
        state, out = bt.ring[j, :, :, :rows], bt.ring[j + 1, :, :, :rows]  # (2, L, R, H) each
        logits = torch.addmm(self.b_head, state[0, -1], self.w_head)  # (R, V)
        bt.hist_logits[j, :rows].copy_(logits)
        biased = logits + bt.bias[:rows]  # (R, V): x + 0 is x for every pick, so unbiased rows draw as they would without
        if full:
            ids, lps = sample_next(biased, bt.temperature[:rows], bt.top_k[:rows], bt.top_p[:rows], bt.penalty[:rows],
                                   bt.seen[:rows], u, min_p=bt.min_p[:rows], presence_penalty=bt.presence[:rows],
                                   frequency_penalty=bt.frequency[:rows], counts=bt.counts[:rows], raw=logits,
                                   branch_free=True)  # (R,), (R,)
            bt.seen[:rows].scatter_(1, ids.unsqueeze(1), True)
            bt.counts[:rows].scatter_add_(1, ids.unsqueeze(1), torch.ones_like(ids, dtype=bt.counts.dtype).unsqueeze(1))
        else:  # no row has a filter or a penalty, so none reads its mask or counts either
            ids, lps = sample_plain(biased, bt.scale[:rows], bt.greedy[:rows], u, raw=logits)
        bt.hist_ids[j, :rows].copy_(ids)
        bt.hist_lps[j, :rows].copy_(lps)
        for layer in range(self.num_layers):
            if layer == 0:
                gates = torch.addmm(self.table0.index_select(0, ids), state[0, 0], self.w_hh0)  # (R, 4H)
            else:
                inp = torch.cat([out[0, layer - 1], state[0, layer]], dim=1)  # (R, 2H): [new h_below, old h_self]
                gates = torch.addmm(self.b_cat[layer - 1], inp, self.w_cat[layer - 1])  # (R, 4H)
            ifo = torch.sigmoid(gates[:, : 3 * H])  # (R, 3H): input, forget, output gates
            g = torch.tanh(gates[:, 3 * H :])  # (R, H)
            c = torch.mul(ifo[:, H : 2 * H], state[1, layer], out=out[1, layer]).addcmul_(ifo[:, :H], g)  # f * c_prev + i * g
            torch.mul(ifo[:, 2 * H :], torch.tanh(c), out=out[0, layer])  # h = o * tanh(c)

    def _capture_all(self) -> None:
        """One graph per bucket, step count and sampler, captured while the batch is empty (warm-up steps only touch padding)."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for rows in self.buckets:
                for full in (False, True):
                    for _ in range(2):  # warm-up: lazy initialisation and workspace allocation happen outside capture
                        self._steps(rows, 1, full)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for k in reversed(self.step_counts):
            for full in (True, False):
                for rows in reversed(self.buckets):  # the largest first: smaller graphs reuse its pool memory
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._steps(rows, k, full)
                    self._graphs[rows, k, full] = graph
        torch.cuda.synchronize(self.device)
        self.batch._neutral(0, self.batch.capacity)


class CudaBackend(TorchBackend):
    """The GPU backend: prompts are ingested on the device (`TorchBackend`'s cuDNN path), and the batch's
    rows, their sampling and each look's k steps live there too, replayed as CUDA graphs (`decoder`, a
    `CudaStep`). On the CPU the same code runs eagerly, without graphs: how the tests and the backend
    contract run it where no GPU is. capacity: the most rows (the engine's max_batch_size);
    max_steps: the steps a look; step_options: CudaStep's (buckets, graphs, pad)."""

    name = "cuda"

    def __init__(self, model, workers: int = 1, device: str | torch.device = "cuda", capacity: int = 256,
                 max_steps: int = 16, **step_options):
        where = resolve_device(device) if isinstance(device, str) else torch.device(device)
        super().__init__(model, workers, where)
        if self.device.type == "cpu" and "buckets" not in step_options:
            # eager on the CPU: pad each call to a bucket within the row counts this CPU's multiply rounds alike
            step_options.update(pad=True, buckets=tuple(b for b in DEFAULT_BUCKETS if b >= max(self.min_rows, MIN_ROWS_PER_CALL)))
        self.decoder = CudaStep(self.weights, self.device, capacity=capacity, max_steps=max_steps, **step_options)

    def describe(self) -> dict:
        step = self.decoder
        return {**super().describe(), "capacity": step.capacity, "steps_a_look": step.max_steps, "graphs": step.graphs,
                "buckets": step.buckets}
