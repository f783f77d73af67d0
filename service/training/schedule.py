"""What a training step is fed: the learning rate at each step, the TBPTT windows of the text, the
optimizer's parameter groups, and the device and precision the step runs in."""

from __future__ import annotations

import math

import torch

from ..model.network import CharLSTM

AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16}


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr over the remaining steps (cfg: a TrainConfig)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `device` cannot train the LSTM under autocast to `dtype`, or None when it can.

    Support depends on the machine: oneDNN has a bf16 LSTM kernel only on CPUs with AVX-512, and on an
    AVX2-only CPU torch raises at the first forward pass. One tiny forward and backward pass tells before a
    run starts, instead of a crash after its set-up.
    """
    lstm = torch.nn.LSTM(8, 8, num_layers=2, batch_first=True).to(device)
    x = torch.zeros(2, 3, 8, device=device, requires_grad=True)  # (B, T, E)
    try:
        with torch.autocast(device.type, dtype=dtype):
            y, _ = lstm(x)  # (B, T, H)
        y.float().sum().backward()
    except RuntimeError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


class Batches:
    """Deterministic TBPTT windows: step -> (x, y, starts_epoch), so resuming needs only the step.

    The text is cut into `batch_size` contiguous streams; each epoch begins at a seeded offset
    in [0, seq_len) so window boundaries move between epochs.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        n = (ids.numel() - 1) // batch_size
        if n < 2 * seq_len:
            raise ValueError(f"training text too short: {ids.numel()} characters for batch_size={batch_size} x 2 x seq_len={seq_len}")
        self.x = ids[: batch_size * n].view(batch_size, n)  # (B, n)
        self.y = ids[1 : batch_size * n + 1].view(batch_size, n)  # (B, n)
        self.seq_len, self.seed = seq_len, seed
        self.per_epoch = (n - seq_len) // seq_len

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        epoch, j = divmod(step, self.per_epoch)
        offset = int(torch.randint(self.seq_len, (1,), generator=torch.Generator().manual_seed(self.seed * 1000003 + epoch)))
        start = offset + j * self.seq_len
        return self.x[:, start : start + self.seq_len], self.y[:, start : start + self.seq_len], j == 0


def param_groups(model: CharLSTM, weight_decay: float) -> list[dict]:
    """Decay matrices (embedding and weights), not biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
