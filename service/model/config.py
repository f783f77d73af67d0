"""The network's shape, and the tensors a model file holds for it: no torch, so a serving install reads
a model's card and weights without it (service/model/network.py builds the torch module from the same config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CharLSTMConfig:
    vocab_size: int = 65  # distinct characters; tiny-shakespeare has 65
    embed_dim: int = 512  # width of the character embedding; must equal hidden_size when tying
    hidden_size: int = 512  # width of each LSTM layer's state
    num_layers: int = 2  # stacked LSTM layers
    dropout: float = 0.2  # per-step dropout between LSTM layers and on the top layer's output (training only)
    embed_dropout: float = 0.0  # per-step dropout on the embedded characters (training only)
    tie_weights: bool = False  # share the embedding matrix with the output head
    # Variational dropout (Gal & Ghahramani): one mask per sequence and layer, shared over time, on the
    # embedding output, between layers and on the top layer's output (training only). Adds to the above.
    variational_dropout: float = 0.0
    weight_drop: float = 0.0  # DropConnect on each layer's recurrent matrix weight_hh_l{k}, new mask per batch (AWD-LSTM)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("dropout", "embed_dropout", "variational_dropout", "weight_drop"):
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


def tensor_shapes(config: CharLSTMConfig) -> dict[str, list[int]]:
    """Every tensor a model file holds, by name (the torch module's state-dict names; a tied head's
    matrix is the embedding's and is not stored): what a file and its card are checked against."""
    V, E, H = config.vocab_size, config.embed_dim, config.hidden_size
    shapes = {"embed.weight": [V, E], "head.bias": [V]}
    if not config.tie_weights:
        shapes["head.weight"] = [V, H]
    for layer in range(config.num_layers):
        shapes |= {f"lstm.weight_ih_l{layer}": [4 * H, E if layer == 0 else H], f"lstm.weight_hh_l{layer}": [4 * H, H],
                   f"lstm.bias_ih_l{layer}": [4 * H], f"lstm.bias_hh_l{layer}": [4 * H]}
    return shapes
