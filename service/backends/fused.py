"""The fused step's weights: what every backend computes from, as numpy arrays (no torch needed).

The step is the LSTM recurrence written out with one matrix multiply per layer over the concatenated
[input, hidden] vector; layer 0's input projection is folded into the embedding, so that layer costs a
row lookup plus one multiply by the recurrent weights. It computes what `nn.LSTM` computes (tested to
float tolerance) with fewer, larger kernels. The weights come from the stored tensors (safetensors, read
as numpy) or from a torch module's state dict, by the same arithmetic, so every install fuses alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A stream's recurrent state: (2, L, H) = (h, c) x layers x hidden, or batched (2, L, B, H), float32.


def tensors_of(model) -> tuple[object, dict[str, np.ndarray]]:
    """(config, name -> fp32 array) of a loaded model (`store.LoadedModel`, numpy already) or a torch
    `CharLSTM` (its state dict, on the host). A tied head's matrix is the embedding's."""
    tensors = getattr(model, "tensors", None)
    if tensors is None:  # a torch module
        tensors = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    return model.config, tensors


@dataclass(frozen=True)
class FusedWeights:
    """The fused step's fp32 weights, gate columns in [i, f, o, g] order."""

    table0: np.ndarray  # (V, 4H): embedding @ w_ih0 + both layer-0 biases
    w_hh0: np.ndarray  # (H, 4H)
    w_cat: list[np.ndarray]  # layers >= 1: (2H, 4H) over [h_below, h_self]
    b_cat: list[np.ndarray]  # (4H,)
    w_head: np.ndarray  # (H, V)
    b_head: np.ndarray  # (V,)

    @classmethod
    def from_model(cls, model) -> FusedWeights:
        """From a `store.LoadedModel` or a torch `CharLSTM` (see `tensors_of`)."""
        config, t = tensors_of(model)
        H = config.hidden_size
        # Gate rows go from nn.LSTM's [i, f, g, o] to [i, f, o, g]: one sigmoid covers the first 3H, one tanh the last H.
        order = np.concatenate([np.arange(0, 2 * H), np.arange(3 * H, 4 * H), np.arange(2 * H, 3 * H)])  # (4H,)
        w_ih0, w_hh0 = t["lstm.weight_ih_l0"][order], t["lstm.weight_hh_l0"][order]  # (4H, E), (4H, H)
        bias0 = (t["lstm.bias_ih_l0"] + t["lstm.bias_hh_l0"])[order]  # (4H,)
        w_cat, b_cat = [], []
        for layer in range(1, config.num_layers):
            w_ih, w_hh = t[f"lstm.weight_ih_l{layer}"], t[f"lstm.weight_hh_l{layer}"]  # (4H, H) each
            w_cat.append(np.ascontiguousarray(np.concatenate([w_ih, w_hh], axis=1)[order].T))  # (2H, 4H)
            b_cat.append(np.ascontiguousarray((t[f"lstm.bias_ih_l{layer}"] + t[f"lstm.bias_hh_l{layer}"])[order]))
        head = t.get("head.weight", t["embed.weight"])  # (V, H): tied to the embedding when the file omits it
        table0 = np.ascontiguousarray((t["embed.weight"].astype(np.float64) @ w_ih0.T.astype(np.float64)).astype(np.float32)
                                      + bias0)  # (V, 4H): the fold in float64, rounded once
        return cls(table0=table0, w_hh0=np.ascontiguousarray(w_hh0.T), w_cat=w_cat, b_cat=b_cat,
                   w_head=np.ascontiguousarray(head.T), b_head=np.array(t["head.bias"], dtype=np.float32))

    def shapes(self) -> tuple[tuple[int, int], ...]:
        """(K, N) of every multiply of a step and its head."""
        return (tuple(self.w_hh0.shape), *(tuple(m.shape) for m in self.w_cat), tuple(self.w_head.shape))


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output column. weight (K, N) fp32 -> (int8 (K, N), scales (N,) fp32)."""
    scales = np.maximum(np.abs(weight).max(axis=0) / np.float32(127.0), np.float32(1e-12))  # (N,)
    q = np.clip(np.round(weight / scales), -127, 127).astype(np.int8)  # (K, N), halves to even
    return q, scales.astype(np.float32)


def pad_rows(x: np.ndarray, rows: int, axis: int = 0) -> np.ndarray:
    """x with copies of its first row appended along `axis` until it has `rows` rows."""
    first = np.take(x, [0] * (rows - x.shape[axis]), axis=axis)
    return np.concatenate([x, first], axis=axis)
