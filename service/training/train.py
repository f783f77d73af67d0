"""Offline training: truncated BPTT over a text, with exact resume, early stopping and a model card.

The trainer owns the loop and knows the model only through `forward(ids, state) -> (logits, state)`.
Everything a resumed run needs (weights, optimizer moments, carried LSTM state, RNG, step, history)
goes into a safetensors + JSON checkpoint: no pickle, and a resumed run continues bit for bit.
With `ema_decay` on, an exponential moving average of the weights (Polyak averaging, as in AWD-LSTM's
averaged SGD) is kept beside the raw ones: evaluations, the kept best weights and the export use it,
while training steps on from the raw weights; the checkpoint holds both.
The model goes into the store before anything optional (the plot) runs, and the checkpoint records
the export only once it happened, so `--resume` can export a run whose export failed.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..model import store
from .corpus import DEFAULT_TRAIN_FRACTION, Corpus
from .evaluate import LN2, score_parallel, score_text
from ..model.network import CharLSTM, CharLSTMConfig, cross_entropy
from ..model.vocab import CharVocab

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"
BEST_WEIGHTS = "best.safetensors"
AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16}
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


def option(default, doc: str):
    """A training setting: its default and the words `charlstm train --help` shows (one statement of each)."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class TrainConfig:
    text: str = field(metadata={"doc": "training text (UTF-8), e.g. tinyshakespeare.txt"})
    out: str = option("runs/default", "run folder: checkpoints, best weights, loss plot")
    name: str | None = option(None, "model name in the store; unset: the run folder's name, which must not be a model already in the store")
    store: str | None = option(None, "model store root (default: the repository's model_store/)")
    save: bool = option(True, "write the best model into the store at the end")
    set_default: bool = option(False, "make the saved model the store's default")
    test_text: str | None = option(None, "a held-out text (e.g. an unseen play): evaluated, never trained on")
    init_from: str | None = option(None, "start from this stored model's weights (name@version); its architecture wins")
    # architecture
    embed_dim: int = option(512, "character embedding width")
    hidden_size: int = option(512, "LSTM state width of every layer")
    num_layers: int = option(2, "stacked LSTM layers")
    dropout: float = option(0.2, "dropout between layers and before the head")
    embed_dropout: float = option(0.0, "dropout on the character embeddings")
    tie_weights: bool = option(False, "the head shares the embedding's weights (needs embed_dim == hidden_size)")
    variational_dropout: float = option(0.0, "one mask per sequence and layer, shared over time (see model/network.py)")
    weight_drop: float = option(0.0, "DropConnect on the recurrent matrices, a new mask every batch")
    # optimisation
    batch_size: int = option(64, "parallel streams, each a contiguous slice of the training text")
    seq_len: int = option(128, "truncated-BPTT window; the state is carried (detached) across windows")
    steps: int = option(2000, "optimizer steps; with --resume: re-plan the learning-rate schedule to end at this step")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(100, "steps of linear warm-up to lr")
    weight_decay: float = option(0.1, "AdamW's decoupled weight decay")
    grad_clip: float = option(1.0, "gradient norm clip")
    ema_decay: float = option(0.0, "weight averaging (EMA of the parameters); 0: off. Averaged weights are evaluated, selected and exported")
    train_fraction: float = option(DEFAULT_TRAIN_FRACTION, "share of the text trained on; the rest validates")
    val_plays: str = option("", "hold out whole plays for validation (a corpus with a manifest, charlstm corpus): comma-separated "
                            "play files, or auto (about 1 - train_fraction of the characters, in a fixed order); empty: split by position")
    # bookkeeping
    eval_every: int = option(200, "steps between evaluations; 0: only at the end")
    eval_streams: int = option(16, "parallel streams of the periodic validation estimate")
    patience: int = option(0, "evaluations without improvement before stopping early; 0: never")
    checkpoint_every: int = option(200, "steps between checkpoints; 0: only at the end (and at --stop-at)")
    seed: int = option(1337, "seed of the initial weights, the batches and dropout")
    threads: int = option(0, "torch CPU threads; 0: torch's default")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    autocast: str = option("off", "mixed precision for the training step's forward pass: off, or bf16 (torch.autocast; the weights, "
                           "optimizer and every evaluation stay fp32). bf16 is several times faster on a CPU with AMX; measure it on yours (README)")
    progress: bool = option(True, "a progress bar")
    stop_at: int = option(0, "end this invocation after this step (a time-boxed session); --resume continues it")
    calibrate: bool = option(False, "after the export, also save a calibrated next version (service/training/calibrate.py)")

    def __post_init__(self) -> None:
        """Refuse impossible settings up front, naming the field and the bound."""
        if not self.text:
            raise ValueError("text must name a UTF-8 text file")
        at_least = {"embed_dim": 1, "hidden_size": 1, "num_layers": 1, "batch_size": 1, "seq_len": 1, "steps": 1,
                    "eval_streams": 1, "warmup_steps": 0, "eval_every": 0, "checkpoint_every": 0, "patience": 0,
                    "threads": 0, "stop_at": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
        for name in ("dropout", "embed_dropout", "variational_dropout", "weight_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_decay < 1.0:  # also refuses NaN
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0.0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number above 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be at least 0, got {self.weight_decay!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if self.tie_weights and self.embed_dim != self.hidden_size and not self.init_from:
            raise ValueError(f"tie_weights needs embed_dim == hidden_size, got {self.embed_dim} != {self.hidden_size}")
        if self.name is not None:
            try:
                store.check_name("name", self.name)
            except store.ModelLoadError as e:
                raise ValueError(str(e)) from None

    def model_config(self, vocab_size: int) -> CharLSTMConfig:
        return CharLSTMConfig(vocab_size=vocab_size, embed_dim=self.embed_dim, hidden_size=self.hidden_size,
                              num_layers=self.num_layers, dropout=self.dropout,
                              embed_dropout=self.embed_dropout, tie_weights=self.tie_weights,
                              variational_dropout=self.variational_dropout, weight_drop=self.weight_drop)

    def hyperparameters(self) -> dict:
        skip = {"text", "out", "name", "store", "save", "set_default", "test_text", "init_from", "progress", "device",
                "threads", "stop_at", "calibrate"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def model_name_for(cfg: TrainConfig) -> str:
    """The name to save under: the one given, or the run folder's name when that is new to the store.

    A derived name never adds a version to an existing model (the store's default above all), so a
    forgotten --name cannot replace the model a service serves.
    """
    if cfg.name:
        return cfg.name
    derived = Path(cfg.out).resolve().name
    try:
        store.check_name("name", derived)
    except store.ModelLoadError:
        raise ValueError(f"no --name given and the run folder's name {derived!r} is not a valid model name: pass --name") from None
    if derived == store.default_model(cfg.store).partition("@")[0]:
        raise ValueError(f"no --name given, and the run folder's name {derived!r} is the store's default model: "
                         f"pass --name {derived} to add a version to it, or choose another --out")
    if store.list_versions(derived, cfg.store):
        raise ValueError(f"no --name given, and the run folder's name {derived!r} is already a model in the store: "
                         f"pass --name {derived} to add a version to it, or choose another --out")
    return derived


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
    done: bool = False  # training ended (all steps or early stop)
    best_score: float = float("inf")  # the selection rule's figure at best_step
    exported: str | None = None  # name@version once the model is in the store


class Trainer:
    def __init__(self, cfg: TrainConfig, command: str | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        if (dtype := AUTOCAST_DTYPES[cfg.autocast]) is not None and (problem := autocast_problem(self.device, dtype)):
            raise ValueError(f"autocast {cfg.autocast} cannot train the LSTM on this {self.device.type} ({problem}): "
                             f"train with autocast off")
        self.corpus = Corpus.read(cfg.text)
        self.val_plays = self.corpus.validation_plays(cfg.val_plays, cfg.train_fraction) if cfg.val_plays else None
        train_text, self.val_text = (self.corpus.split_by_plays(self.val_plays) if self.val_plays
                                     else self.corpus.split(cfg.train_fraction))
        if len(self.val_text) < 2:
            raise ValueError(f"the validation split of {cfg.text} holds {len(self.val_text)} character(s); it needs at "
                             f"least 2: lower train_fraction ({cfg.train_fraction}) or give a longer text")
        self.test = Corpus.read(cfg.test_text) if cfg.test_text else None
        if self.test is not None and self.test.sha256 == self.corpus.sha256:
            raise ValueError("test_text is the training text itself: a test text must be one the model never trains on")
        init = store.load(cfg.init_from, cfg.store) if cfg.init_from else None
        self.init_from = None if init is None else {"model": f"{init.name}@{init.version}",
                                                    "weights_sha256": init.card["weights_sha256"]}
        self.vocab = init.vocab if init is not None else CharVocab.from_text(self.corpus.text)
        torch.manual_seed(cfg.seed)
        self.model = CharLSTM(cfg.model_config(len(self.vocab))).to(self.device)
        if init is not None:
            self.model.load_state_dict(init.model.state_dict())
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99))
        self.batches = Batches(torch.tensor(self.vocab.encode(train_text), dtype=torch.long), cfg.batch_size, cfg.seq_len, cfg.seed)
        self.val_ids = torch.tensor(self.vocab.encode(self.val_text), dtype=torch.long).to(self.device)
        self.test_ids = None if self.test is None else torch.tensor(self.vocab.encode(self.test.text), dtype=torch.long).to(self.device)
        self.run = RunState()
        self.carried = None
        # the averaged weights: one tensor per parameter (a tied matrix once), on the training device
        self.params = list(self.model.parameters())
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay > 0 else None

    # ------------------------------------------------------------------ weight averaging
    @torch.no_grad()
    def autocast(self):
        """The training step's precision context: a no-op unless `autocast` names a lower precision."""
        dtype = AUTOCAST_DTYPES[self.cfg.autocast]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def update_average(self, step: int) -> None:
        """Fold the weights after optimizer step `step` (0-based) into the average.

        The decay ramps up from 0.1 so that the random initial weights wash out early.
        """
        if self.ema is None:
            return
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)

    @contextmanager
    def averaged_weights(self):
        """Within: the model holds the averaged weights (when averaging is on); after: the raw ones again."""
        if self.ema is None:
            yield
            return
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.ema):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

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
        if self.ema is not None:
            for i, a in enumerate(self.ema):
                tensors[f"ema.{i}"] = a.detach().cpu().contiguous()
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

    def save_run_state(self) -> None:
        """Rewrite only the run record of the checkpoint (the tensors stay those of the last step)."""
        meta = json.loads((self.out / CKPT_META).read_text())
        meta["run"] = asdict(self.run)
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
        if self.ema is not None:
            missing = [i for i in range(len(self.ema)) if f"ema.{i}" not in tensors]
            if missing:
                raise ValueError(f"{self.out / CKPT_TENSORS} holds no averaged weights (ema.{missing[0]}) "
                                 f"although ema_decay is {self.cfg.ema_decay}")
            self.ema = [tensors[f"ema.{i}"].to(self.device) for i in range(len(self.ema))]
        if "carried.h" in tensors:
            self.carried = (tensors["carried.h"].to(self.device), tensors["carried.c"].to(self.device))
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        run = dict(meta["run"])
        run.setdefault("best_score", run.get("best_val", float("inf")))  # a checkpoint from before the selection rule
        self.run = RunState(**run)

    @staticmethod
    def saved_config(out: str | Path) -> TrainConfig | None:
        meta = Path(out) / CKPT_META
        if not meta.is_file():
            return None
        return TrainConfig(**json.loads(meta.read_text())["config"])

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> tuple[float, float | None]:
        """(validation, test or None) nats/char, quick parallel estimates (of the averaged weights when on)."""
        with self.averaged_weights():
            val = score_parallel(self.model, self.val_ids, streams=self.cfg.eval_streams)
            test = None if self.test_ids is None else score_parallel(self.model, self.test_ids, streams=self.cfg.eval_streams)
        return val, test

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
            with self.autocast():
                logits, state = model(x, self.carried)  # (B, T, V)
            self.carried = tuple(s.detach().float() for s in state)  # truncate the gradient at the window edge
            loss = cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.update_average(run.step)
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
            if (cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == cfg.steps:
                t_eval = time.perf_counter()
                val, test = self.evaluate()
                run.wall_time_s += time.perf_counter() - t_eval
                row = {"step": run.step, "train_nats": window_loss / window_n, "val_nats": val, "val_bpc": val / LN2}
                if test is not None:
                    row.update(test_nats=test, test_bpc=test / LN2)
                row.update(lr=lr_at(run.step - 1, cfg), chars_per_s=chars_per_step * window_n / max(now - t_last, 1e-9),
                           wall_time_s=round(run.wall_time_s, 1))
                run.history.append(row)
                window_loss, window_n, t_last = 0.0, 0, time.perf_counter()
                score = val if test is None else val + test  # the selection rule (SELECTION_RULE)
                if score < run.best_score:
                    run.best_score, run.best_val, run.best_step, run.evals_since_best = score, val, run.step, 0
                    self.out.mkdir(parents=True, exist_ok=True)
                    tmp = self.out / f".{BEST_WEIGHTS}.tmp"
                    with self.averaged_weights():  # the weights just evaluated (weights_of may alias them on CPU)
                        save_file(store.weights_of(model), str(tmp))
                    tmp.replace(self.out / BEST_WEIGHTS)
                else:
                    run.evals_since_best += 1
                    if cfg.patience and run.evals_since_best >= cfg.patience:
                        run.done = True
                shown = "" if test is None else f" test {test:.4f} nats ({test / LN2:.4f} bpc)"
                bar.write(f"step {run.step}: train {row['train_nats']:.4f} val {val:.4f} nats ({val / LN2:.4f} bpc)"
                          f"{shown}{' *' if run.best_step == run.step else ''}")
            if (cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0) or run.step == cfg.steps or run.done:
                self.save_checkpoint()
        bar.close()
        run.done = True
        self.save_checkpoint()
        return self.finish()

    # ------------------------------------------------------------------ export
    def finish(self) -> Path | None:
        """Load the best weights, measure them in one pass, write the model into the store, then plot.

        The checkpoint records the export only after the store holds the model: a failed export leaves
        a run that `--resume` exports. The plot is optional and comes last; its failure is only a warning.
        """
        best = self.out / BEST_WEIGHTS
        if best.is_file():
            self.model.load_state_dict(load_file(str(best), device=str(self.device)), strict=not self.cfg.tie_weights)
        elif self.ema is not None:  # ended before any evaluation: export the averaged weights all the same
            with torch.no_grad():
                for p, a in zip(self.params, self.ema):
                    p.copy_(a)
        self.model.eval()
        score = score_text(self.model, self.vocab, self.val_text)
        test = None if self.test is None else score_text(self.model, self.vocab, self.test.text)
        metrics = {"val_nats_per_char": score.nats_per_char, "val_bits_per_char": score.bits_per_char,
                   "val_chars": score.chars}
        if test is not None:
            metrics.update(test_nats_per_char=test.nats_per_char, test_bits_per_char=test.bits_per_char,
                           test_chars=test.chars, test_text={"name": self.test.name, "sha256": self.test.sha256,
                                                             "chars": len(self.test.text)})
        summary = {**metrics, "best_step": self.run.best_step, "best_val_nats_parallel_estimate": self.run.best_val}
        store.write_json_atomic(self.out / "result.json", summary)
        print(json.dumps(summary), flush=True)
        path = None
        if self.cfg.save:
            path = self.export(metrics)
        plot = self.out / store.PLOT_FILE
        try:
            plot_losses(self.run, plot, score.nats_per_char, None if test is None else test.nats_per_char)
            if path is not None:
                store.attach_plot(path, plot)
        except Exception as e:  # noqa: BLE001 - the plot is optional; the model is already saved
            print(f"warning: the loss plot was not written ({type(e).__name__}: {e}); the model is saved", file=sys.stderr,
                  flush=True)
        if path is not None and self.cfg.calibrate:
            path = self.calibrate(path)
        return path

    def export(self, metrics: dict) -> Path:
        """Write the (best) model and its card into the store; record it in the checkpoint; set the default if asked."""
        self.model.to("cpu")
        card = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "corpus": self.corpus.describe(self.cfg.train_fraction, self.val_plays),
            "training": {
                "hyperparameters": self.cfg.hyperparameters(),
                "init_from": self.init_from,
                "selection": selection_rule(self.test is not None, self.cfg.ema_decay),
                "steps": self.run.step,
                "best_step": self.run.best_step,
                "chars_seen": self.run.chars_seen,
                "wall_time_s": round(self.run.wall_time_s, 1),
                "device": describe_device(self.device),
                "torch_version": torch.__version__,
                "command": self.run.commands[0],
                "resumed_with": self.run.commands[1:],
            },
            "metrics": {**metrics,
                        "measured": "one pass over each text with the state carried, from a zero state"},
            "history": self.run.history,
        }
        path = store.save(self.model, self.vocab, card, self.cfg.name, self.cfg.store)
        self.run.exported = f"{self.cfg.name}@{path.name}"
        self.save_run_state()
        print(f"saved {path}", flush=True)
        if self.cfg.set_default:
            store.set_default(self.run.exported, self.cfg.store)
            print(f"default model of the store: {self.run.exported}", flush=True)
        return path

    def calibrate(self, trained: Path) -> Path:
        """The trained version is saved as it is; its calibrated copy becomes the next version (and the
        default, when asked). A fit that fails costs only the copy: `charlstm calibrate` can retry it."""
        from .calibrate import run_calibration

        try:
            path, card = run_calibration(self.run.exported, self.cfg.text, self.cfg.test_text, self.cfg.store,
                                         command=self.command, set_default=self.cfg.set_default)
        except ValueError as e:
            print(f"warning: {self.run.exported} was not calibrated ({e}); it is saved as trained", file=sys.stderr,
                  flush=True)
            return trained
        print(f"saved {path}: {self.run.exported} calibrated, validation {card['metrics']['val_nats_per_char']:.4f} nats",
              flush=True)
        return path


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


def run_training(cfg: TrainConfig, resume: bool = False, command: str | None = None,
                 finish_now: bool = False, new_steps: int | None = None) -> Path | None:
    """Start, resume, or (when training ended but the export did not) export a run.

    `finish_now` with `resume` ends a stopped run where it stands and exports its best checkpoint
    (a time-boxed run that cannot reach its last step). `new_steps` with `resume` re-plans the run's
    length: the cosine decay is recomputed to end at that step, so a run that will not get the time
    it was planned for still anneals rather than stopping at a high learning rate.
    """
    if resume:
        saved = Trainer.saved_config(cfg.out)
        if saved is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.out}")
        saved.progress, saved.threads, saved.device, saved.stop_at = cfg.progress, cfg.threads, cfg.device, cfg.stop_at
        saved.set_default = saved.set_default or cfg.set_default
        if new_steps is not None and new_steps != saved.steps:
            saved = replace(saved, steps=new_steps)
        trainer = Trainer(saved, command)
        trainer.load_checkpoint()
        if saved.steps <= trainer.run.step and not trainer.run.done:
            raise ValueError(f"--steps {saved.steps}: the run in {cfg.out} is already at step {trainer.run.step}")
        if finish_now and not trainer.run.done:
            print(f"ending the run in {cfg.out} at step {trainer.run.step} of {saved.steps}", flush=True)
            trainer.run.done = True
            trainer.save_run_state()
        if trainer.run.done:
            if trainer.run.exported or not saved.save:
                where = f" and saved as {trainer.run.exported}" if trainer.run.exported else ""
                print(f"run in {cfg.out} already finished at step {trainer.run.step}{where}", flush=True)
                return None
            print(f"run in {cfg.out} finished training at step {trainer.run.step} but was not exported: exporting", flush=True)
            trainer.run.commands.append(trainer.command)
            return trainer.finish()
        return trainer.train()
    if (Path(cfg.out) / CKPT_META).exists():
        raise FileExistsError(f"{cfg.out} already holds a checkpoint: pass --resume to continue it or choose another --out")
    cfg = replace(cfg, name=model_name_for(cfg) if cfg.save else (cfg.name or Path(cfg.out).resolve().name))
    if cfg.init_from:
        source = store.load(cfg.init_from, cfg.store).model.config
        cfg = replace(cfg, embed_dim=source.embed_dim, hidden_size=source.hidden_size, num_layers=source.num_layers,
                      tie_weights=source.tie_weights)
    return Trainer(cfg, command).train()
