"""The character-level stacked LSTM. Pure torch: it knows nothing of training, HTTP, sessions or batching.

The recurrent state is an argument and a return value, never kept inside the module, so a caller can
carry it across chunks (training), across calls (sessions) or across rows of a batch (the engine).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, B, hidden_size)


@dataclass(frozen=True)
class CharLSTMConfig:
    vocab_size: int = 65  # distinct characters; tiny-shakespeare has 65
    embed_dim: int = 512  # width of the character embedding; must equal hidden_size when tying
    hidden_size: int = 512  # width of each LSTM layer's state
    num_layers: int = 2  # stacked LSTM layers
    dropout: float = 0.2  # dropout between LSTM layers and on the top layer's output (training only)
    embed_dropout: float = 0.0  # dropout on the embedded characters (training only)
    tie_weights: bool = False  # share the embedding matrix with the output head

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("dropout", "embed_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise ValueError(f"tie_weights needs embed_dim == hidden_size, got {self.embed_dim} != {self.hidden_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CharLSTMConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)

    def state_floats(self) -> int:
        """Floats in one stream's recurrent state: layers x (h, c) x hidden."""
        return self.num_layers * 2 * self.hidden_size


class CharLSTM(nn.Module):
    """embedding -> stacked LSTM (dropout between layers) -> linear head over the vocabulary."""

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
        y, state = self.lstm(x, state)  # y: (B, T, H); h, c: (L, B, H)
        logits = self.head(self.out_drop(y))  # (B, T, V)
        return logits, state

    def num_parameters(self) -> int:
        """Distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean nats per character. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
