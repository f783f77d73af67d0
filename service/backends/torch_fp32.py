"""torch, fp32: the fused step as seven kernels a layer, written straight into the new state."""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch

from .base import ROW_PROBES, Backend, agreeing_rows, kernel_threads
from .fused import FusedWeights


@functools.lru_cache(maxsize=None)
def addmm_rows(shapes: tuple[tuple[int, int], ...], threads: int) -> tuple[int, int]:
    """The batch sizes over which torch's fp32 addmm by matrices of these (K, N) shapes gives every row
    the same bits, measured here on random numbers (the kernel is chosen by shape and by torch's thread
    count, not by value; `threads` keys the cache). The narrowest range that holds for every shape."""
    gen = torch.Generator().manual_seed(0)
    lo, hi = 1, 1 << 30
    for K, N in shapes:
        w, b = torch.rand(K, N, generator=gen) - 0.5, torch.rand(N, generator=gen) - 0.5
        x = torch.rand(ROW_PROBES[-1], K, generator=gen) - 0.5
        a, z = agreeing_rows(lambda B: torch.addmm(b, x[:B], w).numpy(), f"an fp32 multiply by {K} x {N}")
        lo, hi = max(lo, a), min(hi, z)
    return lo, hi


class TorchWeights:
    """`FusedWeights` as torch tensors on one device (a view of the numpy arrays on the CPU: no copy)."""

    def __init__(self, w: FusedWeights, device: torch.device):
        move = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        self.table0, self.w_hh0, self.w_head, self.b_head = move(w.table0), move(w.w_hh0), move(w.w_head), move(w.b_head)
        self.w_cat, self.b_cat = [move(m) for m in w.w_cat], [move(b) for b in w.b_cat]


class TorchBackend(Backend):
    """The fused step in fp32 with torch on the CPU (or on a GPU, for prompt ingestion beside cuda.py).
    The engine's arrays are numpy's: they cross into torch without a copy on the CPU."""

    name = "torch"

    def __init__(self, model, workers: int = 1, device: str | torch.device = "cpu"):
        super().__init__(model, workers)
        torch.set_num_threads(kernel_threads())  # the setting, now that torch is loaded
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.tw = TorchWeights(self.weights, self.device)
        self.module = None
        if self.device.type == "cpu":
            self.min_rows, self.max_rows = addmm_rows(self.weights.shapes(), torch.get_num_threads())
            self.head_rows = (self.min_rows, self.max_rows)
        else:
            self.min_rows, self.head_rows = 2, (2, 1 << 30)  # cuda.MIN_ROWS_PER_CALL: a lone row runs as two
            module = model if isinstance(model, torch.nn.Module) else model.model
            self.module = copy.deepcopy(module).to(self.device).eval()  # cuDNN's nn.LSTM ingests prompts there

    def ingest(self, slices: list[list[int]], state: np.ndarray,
               outputs: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """On the CPU, the step's own block (`Backend.ingest`). On a GPU, which ingests prompts for
        cuda.py's graphs, one cuDNN `nn.LSTM` call a row: a step a character would cost a launch each, and
        one row a call keeps a row's bits independent of the others'. state (2, L, R, H)."""
        if self.device.type == "cpu":
            return super().ingest(slices, state, outputs)
        with torch.inference_mode():
            state_d = torch.from_numpy(state).to(self.device)
            finals, ys = [], []
            for r, ids in enumerate(slices):
                h0, c0 = state_d[0, :, r : r + 1].contiguous(), state_d[1, :, r : r + 1].contiguous()  # (L, 1, H) each
                if not ids:
                    finals.append(state_d[:, :, r])
                    ys.append(np.zeros((0, self.hidden), dtype=np.float32))
                    continue
                x = self.module.embed(torch.tensor(ids, dtype=torch.long, device=self.device).unsqueeze(0))  # (1, T, E)
                y, (h, c) = self.module.lstm(x, (h0, c0))  # y (1, T, H); h, c (L, 1, H) each
                finals.append(torch.stack([h[:, 0], c[:, 0]]))  # (2, L, H)
                ys.append(y[0].cpu().numpy())
            return torch.stack(finals, dim=2).cpu().numpy(), ys if outputs else None

    def _head_rows(self, top: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(top).to(self.device)
            return torch.addmm(self.tw.b_head, x, self.tw.w_head).cpu().numpy()

    def _step_rows(self, ids: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Seven kernels per layer after its input (gather or cat): every call costs Python and a GIL
        hand-off, which at small batches is most of the step and at large ones slows the other shares."""
        with torch.inference_mode():  # thread-local: a pool thread enters it for itself
            w, H = self.tw, self.hidden
            ids_t, state_t = torch.from_numpy(ids).to(self.device), torch.from_numpy(state).to(self.device)
            h_all, c_all = state_t[0], state_t[1]  # (L, B, H)
            out = torch.empty(state_t.shape, device=self.device)  # (2, L, B, H), contiguous
            for layer in range(self.num_layers):
                if layer == 0:
                    gates = torch.addmm(w.table0.index_select(0, ids_t), h_all[0], w.w_hh0)  # (B, 4H)
                else:
                    inp = torch.cat([out[0, layer - 1], h_all[layer]], dim=1)  # (B, 2H): [h_below, h_self]
                    gates = torch.addmm(w.b_cat[layer - 1], inp, w.w_cat[layer - 1])  # (B, 4H)
                lstm_gates(gates, c_all[layer], out[:, layer], H)
            return out.cpu().numpy()


def lstm_gates(gates: torch.Tensor, c_prev: torch.Tensor, out: torch.Tensor, H: int) -> None:
    """The cell after its multiply, into out (2, B, H) = (h, c). gates (B, 4H) in [i, f, o, g] order."""
    ifo = torch.sigmoid(gates[:, : 3 * H])  # (B, 3H): input, forget, output gates
    g = torch.tanh(gates[:, 3 * H :])  # (B, H)
    c = torch.mul(ifo[:, H : 2 * H], c_prev, out=out[1])  # f * c_prev
    c.addcmul_(ifo[:, :H], g)  # + i * g
    torch.mul(ifo[:, 2 * H :], torch.tanh(c), out=out[0])  # h = o * tanh(c)
