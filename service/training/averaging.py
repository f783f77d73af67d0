"""Weight averaging (Polyak averaging, as in AWD-LSTM's averaged SGD): an exponential moving average of
the parameters kept beside the raw ones. Evaluations, the kept best weights and the export use it, while
training steps on from the raw weights."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """One averaged tensor per parameter (a tied matrix once), on the parameters' device."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.tensors = [p.detach().clone() for p in params]

    def update(self, step: int) -> None:
        """Fold the weights after optimizer step `step` (0-based) in. The decay ramps up from 0.1 so that
        the random initial weights wash out early."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.tensors, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_into(self) -> None:
        """The parameters take the averaged values for good."""
        for p, a in zip(self.params, self.tensors):
            p.copy_(a)

    @contextmanager
    def applied(self):
        """Within: the parameters hold the averaged weights; after: the raw ones again."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            self.copy_into()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def state(self) -> dict[str, torch.Tensor]:
        """The averaged tensors as a checkpoint holds them."""
        return {f"ema.{i}": a.detach().cpu().contiguous() for i, a in enumerate(self.tensors)}

    def load(self, tensors: dict[str, torch.Tensor], device: torch.device, where: str) -> None:
        missing = [i for i in range(len(self.tensors)) if f"ema.{i}" not in tensors]
        if missing:
            raise ValueError(f"{where} holds no averaged weights (ema.{missing[0]}) although ema_decay is {self.decay}")
        self.tensors = [tensors[f"ema.{i}"].to(device) for i in range(len(self.tensors))]
