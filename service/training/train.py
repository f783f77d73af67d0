"""Offline training: truncated BPTT over a text, with exact resume, early stopping and a model card.

The trainer owns the loop and knows the model only through `forward(ids, state) -> (logits, state)`.
Its parts, one module each: what a step is fed (schedule.py: the learning rate, the TBPTT windows, the
device and precision), the checkpoint (checkpoints.py: everything a resumed run needs, safetensors +
JSON, no pickle, so a resumed run continues bit for bit), weight averaging (averaging.py: with
`ema_decay` on, evaluations, the kept best weights and the export use the average) and what a run
reports (report.py: the card's selection rule, the loss plot).
The model goes into the store before anything optional (the plot) runs, and the checkpoint records
the export only once it happened, so `--resume` can export a run whose export failed.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from ..model import store
from ..model.network import CharLSTM, CharLSTMConfig, cross_entropy
from ..model.vocab import CharVocab
from .averaging import WeightAverage
from .checkpoints import Checkpoint, RunState
from .corpus import DEFAULT_TRAIN_FRACTION, Corpus
from .evaluate import LN2, score_parallel, score_text
from .report import describe_device, plot_losses, selection_rule
from .schedule import AUTOCAST_DTYPES, Batches, autocast_problem, lr_at, param_groups, pick_device

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
        self.average = WeightAverage(list(self.model.parameters()), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.checkpoint = Checkpoint(self.out)

    def autocast(self):
        """The training step's precision context: a no-op unless `autocast` names a lower precision."""
        dtype = AUTOCAST_DTYPES[self.cfg.autocast]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def averaged_weights(self):
        """Within: the model holds the averaged weights (when averaging is on); after: the raw ones again."""
        return self.average.applied() if self.average is not None else nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        self.checkpoint.save(asdict(self.cfg), self.run, self.model, self.optimizer, self.average, self.carried, self.device,
                             self.cfg.tie_weights)

    def save_run_state(self) -> None:
        self.checkpoint.save_run(self.run)

    def load_checkpoint(self) -> None:
        self.run, self.carried = self.checkpoint.load(self.model, self.optimizer, self.average, self.device,
                                                      self.cfg.tie_weights)

    @staticmethod
    def saved_config(out: str | Path) -> TrainConfig | None:
        saved = Checkpoint(out).config()
        return None if saved is None else TrainConfig(**saved)

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
            if self.average is not None:
                self.average.update(run.step)
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
                    with self.averaged_weights():  # the weights just evaluated (weights_of may alias them on CPU)
                        self.checkpoint.save_best(store.weights_of(model))
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
        best = self.checkpoint.best(self.device)
        if best is not None:
            self.model.load_state_dict(best, strict=not self.cfg.tie_weights)
        elif self.average is not None:  # ended before any evaluation: export the averaged weights all the same
            self.average.copy_into()
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
    if Checkpoint(cfg.out).exists():
        raise FileExistsError(f"{cfg.out} already holds a checkpoint: pass --resume to continue it or choose another --out")
    cfg = replace(cfg, name=model_name_for(cfg) if cfg.save else (cfg.name or Path(cfg.out).resolve().name))
    if cfg.init_from:
        source = store.load(cfg.init_from, cfg.store).model.config
        cfg = replace(cfg, embed_dim=source.embed_dim, hidden_size=source.hidden_size, num_layers=source.num_layers,
                      tie_weights=source.tie_weights)
    return Trainer(cfg, command).train()
