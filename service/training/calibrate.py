"""Temperature calibration: one scalar that divides a model's logits, fitted on held-out text, folded into its head.

Why: a network trained with strong dropout (variational dropout, weight drop) and evaluated without
it is overconfident: its logits are too large for the data it has not seen. shakespeare@v2, for one,
scores 1.3790 nats/char on the validation split as trained and 1.3434 with its logits divided by 1.29.
The one temperature T that minimises the cross-entropy of the validation split (temperature scaling,
Guo et al. 2017) is fitted here; an unseen test text plays no part in the fit, so it still judges the
result. T is folded into the output head (an untied copy: head = embedding / T, bias / T), so the
calibrated model is an ordinary model: the fused serving step, int8, the CUDA path and sessions serve
it unchanged, and sampling temperature 1 means the calibrated distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..model import scores, store
from .corpus import Corpus
from .evaluate import module_predict, score_text
from ..model.network import CharLSTM
from ..model.vocab import CharVocab

# the fit keeps 1/T within these bounds: a text that asks for more says the model is broken, not miscalibrated
MIN_INVERSE_TEMPERATURE, MAX_INVERSE_TEMPERATURE = 0.05, 20.0


@dataclass(frozen=True)
class Fit:
    temperature: float
    nats_before: float  # mean cross-entropy of the fitted text at temperature 1
    nats_after: float  # ... at the fitted temperature
    chars: int


def logits_of(model: CharLSTM, vocab: CharVocab, text: str, window: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Every next-character prediction over `text`, state carried (the scorers' walk, scores.logits_of):
    logits (N, V) and targets (N,), N = len(text) - 1."""
    if len(text) < 2:
        raise ValueError("calibration needs a text of at least two characters")
    logits, targets = scores.logits_of(module_predict(model), vocab, text, window)
    return torch.from_numpy(logits), torch.from_numpy(targets)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, iterations: int = 50, rows: int = 8192) -> Fit:
    """The T minimising the mean cross-entropy of softmax(logits / T) against `targets`.

    Newton's method on b = 1/T: the loss is convex in b (a log-sum-exp of b z minus b z_target), its
    first derivative the mean of E_p[z] - z_target and its second the mean variance of z under p.
    Float64, summed `rows` rows at a time (beyond the logits themselves, the memory of a few blocks).
    A fit that ends at a bound of 1/T is refused: no temperature calibrates such a model.
    logits (N, V), targets (N,).
    """
    n = targets.numel()

    def loss_grad_curv(b: float) -> tuple[float, float, float]:
        loss = grad = curv = 0.0
        for start in range(0, n, rows):
            z = logits[start : start + rows].detach().to(torch.float64)  # (R, V)
            t = targets[start : start + rows].view(-1, 1)  # (R, 1)
            logp = torch.log_softmax(b * z, dim=1)  # (R, V)
            p = logp.exp()
            mean_z = (p * z).sum(1)  # (R,)
            loss -= float(logp.gather(1, t).sum())
            grad += float((mean_z - z.gather(1, t).squeeze(1)).sum())
            curv += float(((p * z * z).sum(1) - mean_z**2).clamp_min(0).sum())
        return loss / n, grad / n, curv / n

    b = 1.0
    before = loss = loss_grad_curv(1.0)[0]
    for _ in range(iterations):
        loss, grad, curv = loss_grad_curv(b)
        step = grad / curv if curv > 0 else grad
        new_b = min(max(b - step, MIN_INVERSE_TEMPERATURE), MAX_INVERSE_TEMPERATURE)
        while (new_loss := loss_grad_curv(new_b)[0]) > loss and abs(new_b - b) > 1e-12:  # damped: never worse
            new_b = (new_b + b) / 2
        if abs(new_b - b) < 1e-10:
            break
        b, loss = new_b, new_loss
    if b in (MIN_INVERSE_TEMPERATURE, MAX_INVERSE_TEMPERATURE):
        raise ValueError(f"the best temperature lies beyond {1 / b:g}: the model is broken for this text, "
                         "not miscalibrated")
    return Fit(temperature=1.0 / b, nats_before=before, nats_after=loss, chars=int(n))


def folded(model: CharLSTM, temperature: float) -> CharLSTM:
    """A copy of `model` whose logits are the original's divided by `temperature`: an untied head
    (embedding / T when the original tied them) and bias / T. Everything else is bit for bit the original's."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    out = CharLSTM(replace(model.config, tie_weights=False))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # load_state_dict copies them
    state["head.weight"] = state["head.weight"] / temperature  # (V, H); for a tied model the embedding's copy
    state["head.bias"] = state["head.bias"] / temperature  # (V,)
    out.load_state_dict(state)
    out.eval()
    return out


def _parent_store(parent: Path, root: str | None) -> dict:
    """Where the parent lives when it is not this store (a run's own store, say, whose shakespeare@v1 this
    store would call otherwise): its name@version alone would name another model here."""
    here = store.store_root(root).resolve()
    there = parent.resolve().parent.parent
    return {} if there == here else {"parent_store": str(there)}


def run_calibration(ref: str, text: str, test_text: str | None = None, root: str | None = None,
                    command: str = "", set_default: bool = False) -> tuple[Path, dict]:
    """Fit T on the model's validation split (only its own training text has one, and only held-out
    text can show overconfidence), fold it, save the result as the name's next version.

    The card keeps the parent's training record and curve and says what was fitted on what; its
    metrics are measured on the folded model itself, as `charlstm evaluate` measures them.
    Returns the new version's folder and the card written there (less what the store adds)."""
    parent = store.load(ref, root)
    corpus = Corpus.read(text)
    try:
        validation = corpus.split_as_trained(parent.card)[1]
    except ValueError as e:
        raise ValueError(f"{e}: calibration fits on that text's validation split") from None
    test = Corpus.read(test_text) if test_text else None
    if test is not None and test.sha256 == corpus.sha256:
        raise ValueError("the test text is the training text itself: give a text the model never saw")
    logits, targets = logits_of(parent.model, parent.vocab, validation)  # (N, V), (N,)
    fit = fit_temperature(logits, targets)
    model = folded(parent.model, fit.temperature)
    scores = {"val": (score_text(parent.model, parent.vocab, validation), score_text(model, parent.vocab, validation))}
    if test is not None:
        scores["test"] = (score_text(parent.model, parent.vocab, test.text), score_text(model, parent.vocab, test.text))
    metrics = {}
    for split, (_, after) in scores.items():
        metrics.update({f"{split}_nats_per_char": after.nats_per_char, f"{split}_bits_per_char": after.bits_per_char,
                        f"{split}_chars": after.chars})
    if test is not None:
        metrics["test_text"] = {"name": test.name, "sha256": test.sha256, "chars": len(test.text)}
    card = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "corpus": parent.card["corpus"],
        "training": parent.card.get("training") or {},  # how the weights were trained: the parent's record
        "calibration": {
            "parent": f"{parent.name}@{parent.version}",
            "parent_weights_sha256": parent.card["weights_sha256"],
            **_parent_store(parent.path, root),
            "temperature": fit.temperature,
            "rule": "the one softmax temperature that minimises the cross-entropy of the validation split "
                    "(Newton's method on 1/T, float64); the test text plays no part in the fit",
            "folded": "logits = (h @ (embedding / T).T + bias / T): an untied head, every other weight the parent's "
                      "(config.tie_weights is false; training.hyperparameters are the parent's run)",
            "fitted_on": {"text": corpus.name, "split": "validation", "chars": fit.chars},
            "before": {f"{split}_nats_per_char": before.nats_per_char for split, (before, _) in scores.items()},
            "command": command,
        },
        "metrics": {**metrics, "measured": "one pass over each text with the state carried, from a zero state"},
        "history": parent.card.get("history", []),
    }
    path = store.save(model, parent.vocab, card, parent.name, root)
    plot = parent.path / store.PLOT_FILE
    if plot.is_file():  # the training curve is the parent's: the calibration does not train
        store.attach_plot(path, plot)
    if set_default:
        store.set_default(f"{parent.name}@{path.name}", root)
    return path, card
