"""The fused step's weights: what every backend computes from.

The step is the LSTM recurrence written out with one matrix multiply per layer over the concatenated
[input, hidden] vector; layer 0's input projection is folded into the embedding, so that layer costs a
row lookup plus one multiply by the recurrent weights. It computes what `nn.LSTM` computes (tested to
float tolerance) with fewer, larger kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import CharLSTM

# A stream's recurrent state: (2, L, H) = (h, c) x layers x hidden, or batched (2, L, B, H).


@dataclass(frozen=True)
class FusedWeights:
    """The fused step's fp32 weights, gate columns in [i, f, o, g] order."""

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

    def shapes(self) -> tuple[tuple[int, int], ...]:
        """(K, N) of every multiply of a step and its head."""
        return (tuple(self.w_hh0.shape), *(tuple(m.shape) for m in self.w_cat), tuple(self.w_head.shape))


def quantize_columns(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output column. weight (K, N) fp32 -> (int8 (K, N), scales (N,) fp32)."""
    scales = (weight.abs().amax(dim=0) / 127.0).clamp_(min=1e-12)  # (N,)
    q = torch.round(weight / scales).clamp_(-127, 127).to(torch.int8)  # (K, N)
    return q, scales


def pad_rows(x: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """x with copies of its first row appended along `dim` until it has `rows` rows (contiguous)."""
    first = x.narrow(dim, 0, 1)
    shape = list(x.shape)
    shape[dim] = rows - x.shape[dim]
    return torch.cat([x, first.expand(*shape)], dim=dim)
