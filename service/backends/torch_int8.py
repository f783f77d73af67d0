"""torch, int8: the fused step with its large matrices in int8; the one module that touches torch's quantized kernels.

torch marks its quantized tensors and `torch.ao.quantization` deprecated; everything that uses them
sits here, behind `Int8Linear`, so a replacement kernel is a change to this file alone
(tests/unit/test_quant.py and the backend contract pin the behaviour: logits close to fp32, rows independent of their batch).

The kernel is fbgemm's dynamic quantized linear (`quantized::linear_dynamic` on weights packed by
`quantized::linear_prepack`): weights in int8 with one scale per output channel, activations quantized
to uint8 on the fly, int32 accumulation, fp32 out. Measured on 1024 x 2048 against fp32 `addmm`, it is
the fastest int8 matmul torch offers on a CPU at batch 1 to 128 (`torch._int_mm` needs 17+ rows and
was slower below 128; see benchmarks/README.md).

Row independence, the crux: the kernel chooses ONE activation scale for the whole (B, K) input from
its minimum and maximum, so a row's result would depend on the other rows of its batch, and seeded
generation would change with the batch's composition. Every input of the fused step is an LSTM output,
h = o * tanh(c), bounded by 1 in absolute value; two constant columns, +1 and -1 (with zero weights),
appended to every row pin the input's range to exactly [-1, 1] whatever the batch holds. Every row is
then quantized with the same fixed scale, the integer products are exact, and each output element is
computed from its own row alone: a row's logits are bit-identical alone or in any batch.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .base import Backend, kernel_threads
from .fused import quantize_columns
from .torch_fp32 import TorchWeights, addmm_rows, lstm_gates

PIN = (1.0, -1.0)  # the constant columns: the activation range of every call is [-1, 1]
REDUCE_RANGE = True  # 7-bit activations: no int16 saturation in AVX2's u8 x s8 pair sums (AMD EPYC, no VNNI)


class Int8Linear:
    """`cat(parts) @ W + bias` with W in int8 (a scale per output column), for inputs bounded by 1.

    weight (K, N) fp32, as the fused step stores it (input rows, output columns); bias (N,) or None.
    Call it with the pieces of the input row, e.g. `lin(h_below, h_self)`: they are concatenated with
    the two pin columns in one copy. Every input value must lie in [-1, 1] (LSTM outputs do)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        K, N = weight.shape
        self.in_features, self.out_features = K, N
        q, scales = (torch.from_numpy(a) for a in quantize_columns(weight))
        self.dequantized = (q.float() * scales).contiguous()  # (K, N): what the kernel multiplies by, for tests
        padded = torch.cat([q.T, torch.zeros(N, len(PIN), dtype=torch.int8)], dim=1)  # (N, K + 2): pins weigh 0
        with warnings.catch_warnings():  # the deprecation notice of quantized tensors: this module is the fence
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(padded, scales.double(), torch.zeros(N, dtype=torch.long), 0)
            b = None if bias is None else torch.from_numpy(bias)
            self._packed = torch.ops.quantized.linear_prepack(qweight, b)
        self._pin = torch.tensor([PIN])  # (1, 2)

    def __call__(self, *parts: torch.Tensor) -> torch.Tensor:
        """parts: (B, k_i) with sum k_i = K -> (B, N) fp32."""
        B = parts[0].shape[0]
        x = torch.cat([*parts, self._pin.expand(B, len(PIN))], dim=1)  # (B, K + 2), range exactly [-1, 1]
        return torch.ops.quantized.linear_dynamic(x, self._packed, REDUCE_RANGE)  # (B, N)


class TorchInt8Backend(Backend):
    """The step's recurrent and upper-layer matrices in int8 (`Int8Linear`). The embedding-folded table
    stays fp32 (a lookup), the head too (65 columns: the int8 kernel's fixed cost there exceeds fp32's
    whole multiply, measured at B = 1 and 64), and so does prompt ingestion (`Backend.prefill`).
    The int8 products are exact integers, so the step needs no padding; the fp32 head does."""

    name = "torch-int8"
    weights_kind = "int8"

    def __init__(self, model, workers: int = 1, device: str | torch.device = "cpu"):
        if torch.device(device).type != "cpu":
            raise ValueError(f"torch-int8 runs on the CPU only, not on {torch.device(device).type}")
        super().__init__(model, workers)
        torch.set_num_threads(kernel_threads())  # the setting, now that torch is loaded
        w = self.weights
        self.tw = TorchWeights(w, torch.device("cpu"))
        self.hh0 = Int8Linear(w.w_hh0)  # h0 -> (B, 4H), no bias: the table row carries it
        self.cat = [Int8Linear(wc, bc) for wc, bc in zip(w.w_cat, w.b_cat)]  # layers >= 1: [h_below, h_self] -> (B, 4H) + bias
        self.head_rows = addmm_rows((tuple(w.w_head.shape),), torch.get_num_threads())

    def _head_rows(self, top: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.addmm(self.tw.b_head, torch.from_numpy(top), self.tw.w_head).numpy()

    def _step_rows(self, ids: np.ndarray, state: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # thread-local: a pool thread enters it for itself
            state_t = torch.from_numpy(state)
            h_all, c_all = state_t[0], state_t[1]  # (L, B, H)
            out = torch.empty(state_t.shape)  # (2, L, B, H)
            for layer in range(self.num_layers):
                if layer == 0:
                    gates = self.hh0(h_all[0]).add_(self.tw.table0.index_select(0, torch.from_numpy(ids)))  # (B, 4H)
                else:
                    gates = self.cat[layer - 1](out[0, layer - 1], h_all[layer])  # (B, 4H) over [h_below, h_self]
                lstm_gates(gates, c_all[layer], out[:, layer], self.hidden)
            return out.numpy()
