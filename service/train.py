"""Offline training: truncated BPTT over a text, with exact resume, early stopping and a model card.

The trainer owns the loop and knows the model only through `forward(ids, state) -> (logits, state)`.
Everything a resumed run needs (weights, optimizer moments, carried LSTM state, RNG, step, history)
goes into a safetensors + JSON checkpoint: no pickle, and a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import store
from .corpus import DEFAULT_TRAIN_FRACTION, Corpus
from .evaluate import LN2, score_parallel, score_text
from .model import CharLSTM, CharLSTMConfig, cross_entropy
from .vocab import CharVocab

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"
BEST_WEIGHTS = "best.safetensors"


@dataclass
class TrainConfig:
    text: str  # any UTF-8 text file
    out: str = "runs/default"  # run folder: checkpoints, best weights, loss plot
    name: str = store.DEFAULT_MODEL  # model name in the store
    store: str | None = None  # model store root (default: the repository's model_store/)
    save: bool = True  # write the best model into the store at the end
    # architecture
    embed_dim: int = 512
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    embed_dropout: float = 0.0
    tie_weights: bool = False
    # optimisation
    batch_size: int = 64  # parallel streams, each a contiguous slice of the training text
    seq_len: int = 128  # truncated-BPTT window; the state is carried (detached) across windows
    steps: int = 2000
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    train_fraction: float = DEFAULT_TRAIN_FRACTION
    # bookkeeping
    eval_every: int = 200
    eval_streams: int = 16
    patience: int = 0  # evaluations without improvement before stopping early; 0 = never
    checkpoint_every: int = 200
    seed: int = 1337
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = "auto"  # auto, cpu or cuda
    progress: bool = True
    stop_at: int = 0  # end this invocation after this step (a time-boxed session); --resume continues it

    def model_config(self, vocab_size: int) -> CharLSTMConfig:
        return CharLSTMConfig(vocab_size=vocab_size, embed_dim=self.embed_dim, hidden_size=self.hidden_size,
                              num_layers=self.num_layers, dropout=self.dropout,
                              embed_dropout=self.embed_dropout, tie_weights=self.tie_weights)

    def hyperparameters(self) -> dict:
        skip = {"text", "out", "name", "store", "save", "progress", "device", "threads", "stop_at"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr over the remaining steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


@dataclass
class RunState:
    """What a checkpoint holds besides tensors."""

    step: int = 0
    best_val: float = float("inf")
    best_step: int = -1
    evals_since_best: int = 0
    wall_time_s: float = 0.0
    chars_seen: int = 0
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    curve: list[list[float]] = field(default_factory=list)  # [step, train nats] every few steps
    commands: list[str] = field(default_factory=list)
    done: bool = False


class Trainer:
    def __init__(self, cfg: TrainConfig, command: str | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        self.corpus = Corpus.read(cfg.text)
        train_text, self.val_text = self.corpus.split(cfg.train_fraction)
        self.vocab = CharVocab.from_text(self.corpus.text)
        torch.manual_seed(cfg.seed)
        self.model = CharLSTM(cfg.model_config(len(self.vocab))).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99))
        self.batches = Batches(torch.tensor(self.vocab.encode(train_text), dtype=torch.long), cfg.batch_size, cfg.seq_len, cfg.seed)
        self.val_ids = torch.tensor(self.vocab.encode(self.val_text), dtype=torch.long).to(self.device)
        self.run = RunState()
        self.carried = None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.cfg.tie_weights:
            tensors.pop("model.head.weight")
        opt = self.optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, val in st.items():
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous().reshape(val.shape)
        if self.carried is not None:
            tensors["carried.h"], tensors["carried.c"] = (s.detach().cpu().contiguous() for s in self.carried)
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"config": asdict(self.cfg), "run": asdict(self.run),
                "param_groups": [{k: v for k, v in g.items()} for g in opt["param_groups"]]}
        tmp = self.out / f".{CKPT_TENSORS}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.out / CKPT_TENSORS)
        store.write_json_atomic(self.out / CKPT_META, meta)

    def load_checkpoint(self) -> None:
        meta = json.loads((self.out / CKPT_META).read_text())
        tensors = load_file(str(self.out / CKPT_TENSORS))
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_sd, strict=not self.cfg.tie_weights)
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v.to(self.device) if key != "step" else v
        groups = meta["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if "carried.h" in tensors:
            self.carried = (tensors["carried.h"].to(self.device), tensors["carried.c"].to(self.device))
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.run = RunState(**meta["run"])

    @staticmethod
    def saved_config(out: str | Path) -> TrainConfig | None:
        meta = Path(out) / CKPT_META
        if not meta.is_file():
            return None
        return TrainConfig(**json.loads(meta.read_text())["config"])

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> float:
        return score_parallel(self.model, self.val_ids, streams=self.cfg.eval_streams)

    def train(self) -> Path | None:
        cfg, run, model = self.cfg, self.run, self.model
        run.commands.append(self.command)
        model.train()
        chars_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=run.step, unit="step", dynamic_ncols=True, disable=not cfg.progress,
                   desc=f"train {cfg.name}")
        window_loss, window_n, t_last = 0.0, 0, time.perf_counter()
        while run.step < cfg.steps and not run.done:
            if cfg.stop_at and run.step >= cfg.stop_at:
                bar.close()
                self.save_checkpoint()
                return None
            t0 = time.perf_counter()
            x, y, new_epoch = self.batches(run.step)
            x, y = x.to(self.device), y.to(self.device)
            if new_epoch:
                self.carried = None
            for g in self.optimizer.param_groups:
                g["lr"] = lr_at(run.step, cfg)
            logits, state = model(x, self.carried)  # (B, T, V)
            self.carried = tuple(s.detach() for s in state)  # truncate the gradient at the window edge
            loss = cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            loss_value = float(loss.detach())
            run.step += 1
            run.chars_seen += chars_per_step
            run.wall_time_s += time.perf_counter() - t0
            window_loss, window_n = window_loss + loss_value, window_n + 1
            if run.step % 10 == 0:
                run.curve.append([run.step, loss_value])
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss_value:.3f}", bpc=f"{loss_value / LN2:.3f}",
                            cps=f"{chars_per_step / max(now - t0, 1e-9):,.0f}", refresh=False)
            bar.update(1)
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                t_eval = time.perf_counter()
                val = self.evaluate()
                run.wall_time_s += time.perf_counter() - t_eval
                row = {"step": run.step, "train_nats": window_loss / window_n, "val_nats": val, "val_bpc": val / LN2,
                       "lr": lr_at(run.step - 1, cfg), "chars_per_s": chars_per_step * window_n / (now - t_last),
                       "wall_time_s": round(run.wall_time_s, 1)}
                run.history.append(row)
                window_loss, window_n, t_last = 0.0, 0, time.perf_counter()
                if val < run.best_val:
                    run.best_val, run.best_step, run.evals_since_best = val, run.step, 0
                    self.out.mkdir(parents=True, exist_ok=True)
                    tmp = self.out / f".{BEST_WEIGHTS}.tmp"
                    save_file(store.weights_of(model), str(tmp))
                    tmp.replace(self.out / BEST_WEIGHTS)
                else:
                    run.evals_since_best += 1
                    if cfg.patience and run.evals_since_best >= cfg.patience:
                        run.done = True
                bar.write(f"step {run.step}: train {row['train_nats']:.4f} val {val:.4f} nats ({val / LN2:.4f} bpc)"
                          f"{' *' if run.best_step == run.step else ''}")
            if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps or run.done:
                self.save_checkpoint()
        bar.close()
        run.done = True
        self.save_checkpoint()
        return self.finish()

    # ------------------------------------------------------------------ export
    def finish(self) -> Path | None:
        """Load the best weights, measure them in one pass, plot, and write the model into the store."""
        best = self.out / BEST_WEIGHTS
        if best.is_file():
            self.model.load_state_dict(load_file(str(best), device=str(self.device)), strict=not self.cfg.tie_weights)
        self.model.eval()
        score = score_text(self.model, self.vocab, self.val_text)
        plot = self.out / store.PLOT_FILE
        plot_losses(self.run, plot, score.nats_per_char)
        summary = {"val_nats_per_char": score.nats_per_char, "val_bits_per_char": score.bits_per_char,
                   "val_chars": score.chars, "best_step": self.run.best_step,
                   "best_val_nats_parallel_estimate": self.run.best_val}
        store.write_json_atomic(self.out / "result.json", summary)
        print(json.dumps(summary), flush=True)
        if not self.cfg.save:
            return None
        self.model.to("cpu")
        card = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "corpus": self.corpus.describe(self.cfg.train_fraction),
            "training": {
                "hyperparameters": self.cfg.hyperparameters(),
                "steps": self.run.step,
                "best_step": self.run.best_step,
                "chars_seen": self.run.chars_seen,
                "wall_time_s": round(self.run.wall_time_s, 1),
                "device": self.device.type if self.device.type != "cpu" else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})",
                "torch_version": torch.__version__,
                "command": self.run.commands[0],
                "resumed_with": self.run.commands[1:],
            },
            "metrics": {
                "val_nats_per_char": score.nats_per_char,
                "val_bits_per_char": score.bits_per_char,
                "val_chars": score.chars,
                "measured": "one pass over the validation split with the state carried, from a zero state",
            },
            "history": self.run.history,
        }
        path = store.save(self.model, self.vocab, card, self.cfg.name, self.cfg.store, plot=plot)
        print(f"saved {path}", flush=True)
        return path


def plot_losses(run: RunState, path: Path, final_val: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if run.curve:
        steps, losses = zip(*run.curve)
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train (window)")
    if run.history:
        ax.plot([r["step"] for r in run.history], [r["val_nats"] for r in run.history], "o-", label="validation")
    if final_val is not None and run.best_step >= 0:
        ax.axhline(final_val, ls="--", c="grey", lw=0.8, label=f"best, one pass: {final_val:.4f} nats")
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


def run_training(cfg: TrainConfig, resume: bool = False, command: str | None = None) -> Path | None:
    if resume:
        saved = Trainer.saved_config(cfg.out)
        if saved is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.out}")
        saved.progress, saved.threads, saved.device, saved.stop_at = cfg.progress, cfg.threads, cfg.device, cfg.stop_at
        trainer = Trainer(saved, command)
        trainer.load_checkpoint()
        if trainer.run.done:
            print(f"run in {cfg.out} already finished at step {trainer.run.step}", flush=True)
            return None
    else:
        if (Path(cfg.out) / CKPT_META).exists():
            raise FileExistsError(f"{cfg.out} already holds a checkpoint: pass --resume to continue it or choose another --out")
        trainer = Trainer(cfg, command)
    return trainer.train()
