"""The character-level stacked LSTM. Pure torch: it knows nothing of training, HTTP, sessions or batching.

The recurrent state is an argument and a return value, never kept inside the module, so a caller can
carry it across chunks (training), across calls (sessions) or across rows of a batch (the engine).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CharLSTMConfig

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, B, hidden_size)


def variational_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask for x (B, T, D) drawn once per sequence and shared by all T steps: (B, 1, D), scaled by 1/(1-p)."""
    keep = 1.0 - p
    return x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(keep).div_(keep)  # (B, 1, D)


class CharLSTM(nn.Module):
    """embedding -> stacked LSTM (dropout between layers) -> linear head over the vocabulary.

    In evaluation, and in training without variational dropout or weight drop, the whole stack is one
    `nn.LSTM` call. With either regulariser on, training runs the same fused kernel layer by layer, so a
    mask can sit between layers and a dropped copy of weight_hh can stand in for the stored one; the
    stored parameters and the evaluation path are the same either way.
    """

    def __init__(self, config: CharLSTMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.embed_drop = nn.Dropout(config.embed_dropout)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.out_drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.config.hidden_size
        nn.init.normal_(self.embed.weight, std=0.1 if self.config.tie_weights else 1.0)
        for name, p in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(p, -H**-0.5, H**-0.5)
            elif name.startswith("bias_ih"):
                nn.init.zeros_(p)
                p.data[H : 2 * H] = 1.0  # forget-gate bias 1: remember by default (char-rnn)
            else:
                nn.init.zeros_(p)
        nn.init.zeros_(self.head.bias)
        if not self.config.tie_weights:
            nn.init.uniform_(self.head.weight, -H**-0.5, H**-0.5)

    def initial_state(self, batch_size: int, device=None, dtype=torch.float32) -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids (B, T) int64 -> logits (B, T, V) and the state after the last character."""
        x = self.embed_drop(self.embed(ids))  # (B, T, E)
        cfg = self.config
        if self.training and (cfg.variational_dropout > 0 or cfg.weight_drop > 0):
            y, state = self._regularised_lstm(x, state)
        else:
            y, state = self.lstm(x, state)  # y: (B, T, H); h, c: (L, B, H)
        logits = self.head(self.out_drop(y))  # (B, T, V)
        return logits, state

    def _regularised_lstm(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """Training path with variational dropout and/or weight drop: one fused single-layer LSTM call per layer."""
        cfg, lstm = self.config, self.lstm
        if state is None:
            state = self.initial_state(x.size(0), x.device, x.dtype)
        h0, c0 = state  # (L, B, H) each
        hs, cs = [], []
        for layer in range(cfg.num_layers):
            if layer > 0 and cfg.dropout > 0:
                x = F.dropout(x, cfg.dropout, training=True)  # what nn.LSTM's inter-layer dropout does
            if cfg.variational_dropout > 0:
                x = x * variational_mask(x, cfg.variational_dropout)  # (B, T, D), same mask at every step
            w_hh = getattr(lstm, f"weight_hh_l{layer}")  # (4H, H)
            if cfg.weight_drop > 0:
                w_hh = F.dropout(w_hh, cfg.weight_drop, training=True)  # DropConnect: a new mask each call
            weights = [getattr(lstm, f"weight_ih_l{layer}"), w_hh, getattr(lstm, f"bias_ih_l{layer}"),
                       getattr(lstm, f"bias_hh_l{layer}")]
            x, h, c = torch._VF.lstm(x, (h0[layer : layer + 1], c0[layer : layer + 1]), weights, True, 1, 0.0,
                                     True, False, True)  # x: (B, T, H); h, c: (1, B, H)
            hs.append(h)
            cs.append(c)
        if cfg.variational_dropout > 0:
            x = x * variational_mask(x, cfg.variational_dropout)  # (B, T, H) before the head
        return x, (torch.cat(hs), torch.cat(cs))

    def num_parameters(self) -> int:
        """Distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean nats per character. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
