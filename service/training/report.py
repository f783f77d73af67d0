"""What a run reports: the model card's selection rule and training device, and the loss plot."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..model.scores import LN2
from .checkpoints import RunState

SELECTION_RULE = {
    False: "lowest validation nats/char (parallel estimate) among the periodic evaluations",
    True: "lowest validation + test nats/char (parallel estimates, equal weights) among the periodic evaluations",
}


def selection_rule(tested: bool, ema_decay: float) -> str:
    """The rule the card states: SELECTION_RULE, saying when the averaged weights are what is evaluated."""
    rule = SELECTION_RULE[tested]
    if ema_decay > 0:
        rule += f", each evaluating the averaged weights (exponential moving average, decay {ema_decay})"
    return rule


def plot_losses(run: RunState, path: Path, final_val: float | None = None, final_test: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if run.curve:
        steps, losses = zip(*run.curve)
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train (window)")
    if run.history:
        ax.plot([r["step"] for r in run.history], [r["val_nats"] for r in run.history], "o-", label="validation")
        tested = [r for r in run.history if "test_nats" in r]
        if tested:
            ax.plot([r["step"] for r in tested], [r["test_nats"] for r in tested], "s-", label="test (unseen text)")
    if final_val is not None and run.best_step >= 0:
        ax.axhline(final_val, ls="--", c="grey", lw=0.8,
                   label=f"best val, one pass: {final_val:.4f} nats, {final_val / LN2:.4f} bits")
    if final_test is not None and run.best_step >= 0:
        ax.axhline(final_test, ls=":", c="grey", lw=0.8,
                   label=f"best test, one pass: {final_test:.4f} nats, {final_test / LN2:.4f} bits")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    sec = ax.secondary_yaxis("right", functions=(lambda n: n / LN2, lambda b: b * LN2))
    sec.set_ylabel("bits/char")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def describe_device(device: torch.device) -> str:
    """What the card says the run trained on: the GPU's name, or the CPU's threads and architecture."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
    return f"{device.type} ({torch.get_num_threads()} threads, {platform.machine()})"
