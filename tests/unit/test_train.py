"""Training: it learns, resumes exactly, stops early, and the command line drives it end to end."""

import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from service.cli import generation
from service.model import store
from service.engine.types import Done, GenerationRequest
from service.sampling import SamplingParams
from service.training.checkpoints import BEST_WEIGHTS
from service.training.evaluate import read_chunks, score_chunks, score_text
from service.training.report import SELECTION_RULE, selection_rule
from service.training.schedule import autocast_problem, lr_at
from service.training.train import Trainer, TrainConfig, run_training

from ..conftest import make_play, tiny_config
from ..reference import reference_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_trained_model_learned_the_play(tiny_model, play_file):
    text = play_file.read_text()
    _, val = text[: int(len(text) * 0.9)], text[int(len(text) * 0.9):]
    score = score_text(tiny_model.model, tiny_model.vocab, val)
    uniform = math.log(len(tiny_model.vocab))
    assert score.nats_per_char < 0.75 * uniform
    assert score.chars == len(val) - 1
    card = tiny_model.card["metrics"]
    assert card["val_nats_per_char"] == pytest.approx(score.nats_per_char, rel=1e-6)
    assert card["val_bits_per_char"] == pytest.approx(score.nats_per_char / math.log(2), rel=1e-6)
    history = tiny_model.card["history"]
    assert [r["step"] for r in history] == [40, 80, 120] and history[-1]["val_nats"] < history[0]["val_nats"]


def test_streaming_score_does_not_depend_on_chunking(tiny_model, play_file):
    text = play_file.read_text()[:3000]
    whole = score_text(tiny_model.model, tiny_model.vocab, text, window=4096)
    pieces = [text[i : i + 333] for i in range(0, len(text), 333)]
    chunked = score_chunks(tiny_model.model, tiny_model.vocab, pieces, window=100)
    assert chunked.chars == whole.chars == len(text) - 1
    assert chunked.nats_total == pytest.approx(whole.nats_total, rel=1e-5)


def whole_and_resumed(play_file, tmp_path, stop_at: int, **settings) -> tuple[dict, dict, list, list]:
    """One run straight through (store s1) and the same run stopped at `stop_at` and resumed (store s2).
    Returns both final checkpoints' tensors and both evaluation histories."""
    run_training(tiny_config(play_file, tmp_path / "whole", tmp_path / "s1", **settings))
    cut = tiny_config(play_file, tmp_path / "cut", tmp_path / "s2", stop_at=stop_at, **settings)
    assert run_training(cut) is None  # stopped, nothing exported yet
    stopped = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["run"]
    assert stopped["step"] == stop_at and not stopped["done"]
    cut.stop_at = 0
    run_training(cut, resume=True)
    a, b = (load_file(str(tmp_path / run / "checkpoint.safetensors")) for run in ("whole", "cut"))
    ha, hb = (json.loads((tmp_path / run / "checkpoint.json").read_text())["run"]["history"] for run in ("whole", "cut"))
    return a, b, ha, hb


def test_resume_continues_exactly(play_file, tmp_path):
    a, b, ha, hb = whole_and_resumed(play_file, tmp_path, 30, steps=60, eval_every=20, checkpoint_every=20, dropout=0.3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["val_nats"] for r in ha] == [r["val_nats"] for r in hb]
    card = store.load("tiny", tmp_path / "s2").card
    assert len(card["training"]["resumed_with"]) == 1


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(play_file, tmp_path):
    with pytest.raises(FileNotFoundError):
        run_training(tiny_config(play_file, tmp_path / "r", tmp_path / "s"), resume=True)
    run_training(tiny_config(play_file, tmp_path / "r", tmp_path / "s", steps=10, eval_every=10, save=False))
    with pytest.raises(FileExistsError):
        run_training(tiny_config(play_file, tmp_path / "r", tmp_path / "s", steps=10))


def test_early_stopping_ends_the_run(play_file, tmp_path):
    cfg = tiny_config(play_file, tmp_path / "r", tmp_path / "s", steps=400, eval_every=5, patience=2, lr=0.5,
                      min_lr=0.5, warmup_steps=1, save=False)
    run_training(cfg)
    run = json.loads((tmp_path / "r" / "checkpoint.json").read_text())["run"]
    assert run["done"] and run["step"] < 400 and run["evals_since_best"] == 2


def test_learning_rate_warms_up_then_decays(play_file, tmp_path):
    cfg = tiny_config(play_file, tmp_path, tmp_path, steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_sampling_is_seeded(tiny_model):
    def text(seed: int) -> str:
        request = GenerationRequest(prompt_ids=tiny_model.vocab.encode("KING:\n"), max_new_tokens=80,
                                    params=SamplingParams(temperature=0.8), seed=seed)
        return [e for e in generation.run(tiny_model, request) if isinstance(e, Done)][0].text

    a, b, c = text(3), text(3), text(4)
    assert a == b != c and len(a) == 80 and set(a) <= set(tiny_model.vocab.chars)


def cli(*args, store_root, **env_vars):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_vars)
    return subprocess.run([sys.executable, "-m", "service.cli", "--store", str(store_root), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_evaluate_sample_and_models(trained_store, tiny_model, play_file, tmp_path):
    text = tmp_path / "val.txt"
    text.write_text(play_file.read_text()[-2000:])
    out = cli("evaluate", "--model", "tiny@v1", "--text", str(text), "--json", store_root=trained_store)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    expected = score_chunks(tiny_model.model, tiny_model.vocab, read_chunks(text))
    assert got["chars"] == 1999 and got["nats_per_char"] == pytest.approx(expected.nats_per_char, rel=1e-6)
    assert got["bits_per_char"] == pytest.approx(got["nats_per_char"] / math.log(2))

    first = cli("sample", "--model", "tiny", "--prompt", "ROMEO:", "--length", "60", "--seed", "11", store_root=trained_store)
    again = cli("sample", "--model", "tiny", "--prompt", "ROMEO:", "--length", "60", "--seed", "11", store_root=trained_store)
    assert first.returncode == 0 and first.stdout == again.stdout and len(first.stdout) == 61
    expected_text = "".join(reference_text(tiny_model.model, tiny_model.vocab, "ROMEO:", 60, seed=11))  # server defaults
    assert first.stdout == expected_text + "\n"

    listing = cli("models", store_root=trained_store)
    assert listing.returncode == 0 and "tiny@v1" in listing.stdout


def test_cli_fails_with_one_clear_message(trained_store, tmp_path):
    out = cli("evaluate", "--model", "tiny@v7", "--text", str(tmp_path / "x.txt"), store_root=trained_store)
    assert out.returncode == 2 and "unknown version 'v7'" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("KING: {}")
    out = cli("evaluate", "--model", "tiny", "--text", str(bad), store_root=trained_store)
    assert out.returncode == 2 and "'{' (U+007B) at position 6" in out.stderr


def test_cli_trains_a_model(play_file, tmp_path):
    out = cli("train", "--text", str(play_file), "--out", str(tmp_path / "run"), "--name", "cli", "--hidden-size", "16",
              "--embed-dim", "16", "--steps", "20", "--batch-size", "4", "--seq-len", "16", "--eval-every", "10",
              "--no-progress", "--tie-weights", "--ema-decay", "0.9", store_root=tmp_path / "store")
    assert out.returncode == 0, out.stderr
    card = store.load("cli", tmp_path / "store").card
    assert card["training"]["hyperparameters"]["ema_decay"] == 0.9
    assert card["training"]["command"].startswith("charlstm --store") and "--tie-weights" in card["training"]["command"]
    assert card["config"]["tie_weights"] is True and card["training"]["steps"] == 20


@pytest.fixture(scope="module")
def unseen_play(tmp_path_factory):
    """A held-out text: another play of the same kind, never trained on."""
    path = tmp_path_factory.mktemp("unseen") / "unseen.txt"
    path.write_text(make_play(3_000, seed=99), encoding="utf-8")
    return path


def test_resume_is_exact_with_variational_dropout_and_weight_drop(play_file, unseen_play, tmp_path):
    a, b, _, _ = whole_and_resumed(play_file, tmp_path, 15, steps=40, eval_every=10, checkpoint_every=10,
                                   variational_dropout=0.3, weight_drop=0.3, test_text=str(unseen_play))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    card = store.load("tiny", tmp_path / "s2").card
    assert card["config"]["variational_dropout"] == 0.3 and card["config"]["weight_drop"] == 0.3
    hp = card["training"]["hyperparameters"]
    assert hp["variational_dropout"] == 0.3 and hp["weight_drop"] == 0.3
    # the unseen text: at every evaluation, in the card in nats and bits, and in the selection rule
    history = card["history"]
    assert [r["step"] for r in history] == [10, 20, 30, 40] and all("test_nats" in r and "test_bpc" in r for r in history)
    m = card["metrics"]
    assert m["test_bits_per_char"] == pytest.approx(m["test_nats_per_char"] / math.log(2))
    assert m["test_chars"] == len(unseen_play.read_text()) - 1 and m["test_text"]["name"] == "unseen.txt"
    assert card["training"]["selection"] == SELECTION_RULE[True]
    best = min(history, key=lambda r: r["val_nats"] + r["test_nats"])
    assert card["training"]["best_step"] == best["step"]


def test_resume_is_exact_with_weight_averaging(play_file, unseen_play, tmp_path):
    a, b, ha, hb = whole_and_resumed(play_file, tmp_path, 15, steps=40, eval_every=10, checkpoint_every=10,
                                     ema_decay=0.95, weight_drop=0.3, test_text=str(unseen_play))
    assert a.keys() == b.keys() and "ema.0" in a  # the averaged weights travel in the checkpoint
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [(r["val_nats"], r["test_nats"]) for r in ha] == [(r["val_nats"], r["test_nats"]) for r in hb]
    best_a = load_file(str(tmp_path / "whole" / "best.safetensors"))
    best_b = load_file(str(tmp_path / "cut" / "best.safetensors"))
    assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    card = store.load("tiny", tmp_path / "s2").card
    assert card["training"]["hyperparameters"]["ema_decay"] == 0.95
    selection = card["training"]["selection"]
    assert selection == selection_rule(True, 0.95) and selection.startswith(SELECTION_RULE[True])
    assert "averaged weights" in selection and "averaged" not in selection_rule(True, 0.0)


def test_weight_averaging_evaluates_selects_and_exports_the_averaged_weights(play_file, tmp_path):
    common = dict(steps=12, eval_every=6, checkpoint_every=0)
    run_training(tiny_config(play_file, tmp_path / "raw", tmp_path / "s1", **common))
    path = run_training(tiny_config(play_file, tmp_path / "avg", tmp_path / "s2", ema_decay=0.9, **common))
    raw = load_file(str(tmp_path / "raw" / "checkpoint.safetensors"))
    avg = load_file(str(tmp_path / "avg" / "checkpoint.safetensors"))
    assert not any(k.startswith("ema.") for k in raw)
    # training steps on from the raw weights: evaluating the average (mid-run too) leaves them untouched
    for k in raw:
        if k.startswith("model."):
            assert torch.equal(raw[k], avg[k]), k
    # ... but every evaluation measured the averaged model, not the raw one
    raw_history = json.loads((tmp_path / "raw" / "checkpoint.json").read_text())["run"]["history"]
    loaded = store.load(str(path))
    history = loaded.card["history"]
    assert [r["step"] for r in history] == [r["step"] for r in raw_history] == [6, 12]
    assert all(r["val_nats"] != q["val_nats"] for r, q in zip(history, raw_history))
    # the kept and exported weights are the averaged ones (the last evaluation is the best here)
    assert loaded.card["training"]["best_step"] == 12
    best = load_file(str(tmp_path / "avg" / BEST_WEIGHTS))
    names = [n for n, _ in loaded.model.named_parameters()]
    assert len(names) == sum(k.startswith("ema.") for k in avg)
    for i, n in enumerate(names):
        assert torch.equal(best[n], avg[f"ema.{i}"]), n
        assert not torch.equal(best[n], avg[f"model.{n}"]), n
        assert torch.equal(loaded.model.state_dict()[n], best[n]), n


def test_weight_averaging_ramps_its_decay_up(play_file, tmp_path):
    """After step t the average moves toward the weights by 1 - min(ema_decay, (1 + t) / (10 + t)); tied once."""
    cfg = tiny_config(play_file, tmp_path / "r", tmp_path / "s", steps=2, eval_every=0, checkpoint_every=0,
                      ema_decay=0.9, tie_weights=True, save=False, stop_at=1)
    fresh = Trainer(cfg)
    names = [n for n, _ in fresh.model.named_parameters()]
    init = [p.detach().clone() for p in fresh.model.parameters()]
    assert "head.weight" not in names
    assert run_training(cfg) is None
    one = load_file(str(tmp_path / "r" / "checkpoint.safetensors"))
    cfg.stop_at = 0
    run_training(cfg, resume=True)
    two = load_file(str(tmp_path / "r" / "checkpoint.safetensors"))
    assert sorted(k for k in two if k.startswith("ema.")) == sorted(f"ema.{i}" for i in range(len(names)))
    for i, n in enumerate(names):
        step0 = torch.lerp(init[i], one[f"model.{n}"], 1 - 1 / 10)  # min(0.9, 1/10): the start washes out
        torch.testing.assert_close(one[f"ema.{i}"], step0)
        step1 = torch.lerp(step0, two[f"model.{n}"], 1 - 2 / 11)
        torch.testing.assert_close(two[f"ema.{i}"], step1)
        assert not torch.equal(two[f"ema.{i}"], two[f"model.{n}"]), n


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be an integer of at least 1, got 0"),
    ("batch_size", -1, "batch_size must be an integer of at least 1"),
    ("eval_every", -5, "eval_every must be an integer of at least 0"),
    ("eval_streams", 0, "eval_streams must be an integer of at least 1"),
    ("checkpoint_every", -1, "checkpoint_every must be an integer of at least 0"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
    ("weight_drop", 1.5, r"weight_drop must be in \[0, 1\)"),
    ("variational_dropout", -0.1, r"variational_dropout must be in \[0, 1\)"),
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\), got 1.0"),
    ("ema_decay", -0.5, r"ema_decay must be in \[0, 1\), got -0.5"),
    ("lr", 0.0, "lr must be a finite number above 0"),
    ("min_lr", 1.0, r"min_lr must be in \[0, lr=0.01\]"),
    ("train_fraction", 1.0, r"train_fraction must be in \(0, 1\)"),
    ("grad_clip", float("nan"), "grad_clip must be a finite number above 0"),
    ("device", "tpu", "device must be auto, cpu, cuda or cuda:N"),
    ("name", "../escape", "invalid model name"),
])
def test_config_names_the_field_and_the_bound(play_file, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(play_file, tmp_path / "r", tmp_path / "s", **{field: value})


def test_zero_intervals_and_a_validation_text_shorter_than_the_streams(tmp_path):
    text = tmp_path / "short-val.txt"
    body = make_play(8_000, seed=3)
    text.write_text(body)
    fraction = (len(body) - 5) / len(body) + 1e-9  # 5 validation characters for 16 evaluation streams
    cfg = tiny_config(text, tmp_path / "r", tmp_path / "s", steps=12, eval_every=0, checkpoint_every=0,
                      eval_streams=16, train_fraction=fraction)
    path = run_training(cfg)
    card = store.load(str(path)).card
    assert card["corpus"]["split"]["val_chars"] == 5 and card["metrics"]["val_chars"] == 4
    assert [r["step"] for r in card["history"]] == [12]  # evaluated only at the end
    run = json.loads((tmp_path / "r" / "checkpoint.json").read_text())["run"]
    assert run["done"] and run["step"] == 12 and run["exported"] == "tiny@v1"
    with pytest.raises(ValueError, match="validation split .* holds 1 character"):
        run_training(tiny_config(text, tmp_path / "r2", tmp_path / "s", train_fraction=(len(body) - 1) / len(body) + 1e-9))


def test_a_failing_plot_never_costs_the_model(play_file, tmp_path, monkeypatch, capsys):
    import service.training.train as train_module

    def broken_plot(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(train_module, "plot_losses", broken_plot)
    path = run_training(tiny_config(play_file, tmp_path / "r", tmp_path / "s", steps=10, eval_every=5))
    assert path is not None and store.load("tiny", tmp_path / "s").version == "v1"
    assert not (path / "loss.png").exists()
    assert "the loss plot was not written (ImportError" in capsys.readouterr().err


def test_a_failed_export_is_exported_by_resume(play_file, tmp_path, monkeypatch, capsys):
    import service.training.train as train_module

    real_save = store.save

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module.store, "save", full_disk)
    cfg = tiny_config(play_file, tmp_path / "r", tmp_path / "s", steps=10, eval_every=5)
    with pytest.raises(OSError, match="No space left"):
        run_training(cfg)
    run = json.loads((tmp_path / "r" / "checkpoint.json").read_text())["run"]
    assert run["done"] and run["exported"] is None  # trained, but not "done" with the export
    assert store.list_versions("tiny", tmp_path / "s") == []
    monkeypatch.setattr(train_module.store, "save", real_save)
    path = run_training(cfg, resume=True)
    assert path is not None and path.name == "v1" and (path / "loss.png").is_file()
    card = store.load("tiny", tmp_path / "s").card
    assert card["training"]["steps"] == 10 and len(card["training"]["resumed_with"]) == 1
    assert run_training(cfg, resume=True) is None
    assert "already finished at step 10 and saved as tiny@v1" in capsys.readouterr().out
    assert store.list_versions("tiny", tmp_path / "s") == ["v1"]


def test_a_stopped_run_can_be_finished_early(play_file, tmp_path):
    cfg = tiny_config(play_file, tmp_path / "r", tmp_path / "s", steps=60, eval_every=10, stop_at=25)
    assert run_training(cfg) is None
    path = run_training(cfg, resume=True, finish_now=True)
    card = store.load(str(path)).card
    assert card["training"]["steps"] == 25 and card["training"]["best_step"] in (10, 20)
    assert card["training"]["hyperparameters"]["steps"] == 60  # the plan, beside what was done


def test_resume_with_steps_replans_the_schedule(play_file, tmp_path):
    """A run planned for 60 steps, stopped at 10 and resumed with --steps 30, anneals to min_lr by step 30."""
    common = ("--text", str(play_file), "--out", str(tmp_path / "run"), "--name", "replan", "--hidden-size", "16",
              "--embed-dim", "16", "--batch-size", "4", "--seq-len", "16", "--eval-every", "10", "--no-progress",
              "--warmup-steps", "2", "--lr", "1e-2", "--min-lr", "1e-4")
    out = cli("train", *common, "--steps", "60", "--stop-at", "10", store_root=tmp_path / "store")
    assert out.returncode == 0, out.stderr
    too_short = cli("train", "--resume", *common, "--steps", "10", store_root=tmp_path / "store")
    assert too_short.returncode != 0 and "already at step 10" in too_short.stderr
    out = cli("train", "--resume", *common, "--steps", "30", store_root=tmp_path / "store")
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["run"]["step"] == 30 and meta["run"]["done"] and meta["config"]["steps"] == 30
    planned = TrainConfig(**{**meta["config"], "steps": 60})
    last_lr = meta["param_groups"][0]["lr"]
    assert last_lr == pytest.approx(lr_at(29, TrainConfig(**meta["config"]))) and last_lr < lr_at(29, planned) / 5
    card = store.load("replan", tmp_path / "store").card
    assert card["training"]["steps"] == 30 and card["training"]["hyperparameters"]["steps"] == 30
    assert "--steps 30" in card["training"]["resumed_with"][-1]


def test_init_from_starts_from_a_stored_model(tiny_model, play_file, tmp_path):
    cfg = tiny_config(play_file, tmp_path / "r", tmp_path / "s", init_from=str(tiny_model.path), steps=2, lr=1e-9,
                      min_lr=0.0, warmup_steps=0, eval_every=1, hidden_size=64, embed_dim=64, dropout=0.0)
    path = run_training(cfg)
    loaded = store.load(str(path))
    assert loaded.card["training"]["init_from"] == {"model": "tiny@v1", "weights_sha256": tiny_model.card["weights_sha256"]}
    assert loaded.model.config.hidden_size == tiny_model.model.config.hidden_size == 32  # the source's architecture
    for k, v in tiny_model.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=1e-6)
    assert loaded.card["history"][0]["val_nats"] == pytest.approx(tiny_model.card["history"][-1]["val_nats"], rel=0.05)


def test_the_name_is_given_or_derived_from_a_new_run_folder(play_file, tmp_path):
    cfg = TrainConfig(text=str(play_file), out=str(tmp_path / "my-run"), store=str(tmp_path / "s"), embed_dim=8,
                      hidden_size=8, batch_size=4, seq_len=16, steps=4, eval_every=2, progress=False)
    assert run_training(cfg).parent.name == "my-run"
    again = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "elsewhere" / "my-run")})
    with pytest.raises(ValueError, match="already a model in the store: pass --name my-run"):
        run_training(again)
    trap = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / store.DEFAULT_MODEL)})
    with pytest.raises(ValueError, match="is the store's default model"):
        run_training(trap)


@pytest.mark.skipif(autocast_problem(torch.device("cpu"), torch.bfloat16) is not None,
                    reason="this CPU has no bf16 LSTM kernel (test_bf16_on_a_cpu_without_a_bf16_lstm_is_refused_up_front covers it)")
def test_a_bf16_forward_pass_trains_a_model_and_the_card_says_so(play_file, tmp_path):
    root = tmp_path / "store"
    run_training(tiny_config(play_file, tmp_path / "run", root, steps=20, eval_every=0, checkpoint_every=0, autocast="bf16"))
    card = store.load("tiny", root).card
    assert card["training"]["hyperparameters"]["autocast"] == "bf16"
    assert card["metrics"]["val_bits_per_char"] < math.log2(len(card["vocab"]))  # it learned: better than a uniform guess
    with pytest.raises(ValueError, match="autocast must be one of off, bf16"):
        tiny_config(play_file, tmp_path / "other", root, autocast="fp8")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's ISA cap is an x86 setting")
def test_bf16_on_a_cpu_without_a_bf16_lstm_is_refused_up_front(play_file, tmp_path):
    """oneDNN capped at AVX2 has no bf16 LSTM, as on an AVX2-only machine: the run refuses before it starts."""
    root, out = tmp_path / "store", tmp_path / "run"
    proc = cli("train", "--text", str(play_file), "--out", str(out), "--name", "tiny", "--embed-dim", "16",
               "--hidden-size", "16", "--steps", "4", "--autocast", "bf16", "--no-progress", store_root=root,
               ONEDNN_MAX_CPU_ISA="AVX2")
    assert proc.returncode != 0
    assert "autocast bf16 cannot train the LSTM on this cpu" in proc.stderr and "train with autocast off" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not store.list_versions("tiny", root)  # nothing started, nothing half-written
