"""Training: it learns, resumes exactly, stops early, and the command line drives it end to end."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from service import store
from service.evaluate import read_chunks, score_chunks, score_text
from service.generate import generate_text
from service.train import lr_at, run_training

from .conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_resume_continues_exactly(play_file, tmp_path):
    whole = tiny_config(play_file, tmp_path / "whole", tmp_path / "s1", steps=60, eval_every=20, checkpoint_every=20, dropout=0.3)
    run_training(whole)
    cut = tiny_config(play_file, tmp_path / "cut", tmp_path / "s2", steps=60, eval_every=20, checkpoint_every=20, dropout=0.3, stop_at=30)
    assert run_training(cut) is None  # stopped after step 30, nothing exported yet
    stopped = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["run"]
    assert stopped["step"] == 30 and not stopped["done"]
    cut.stop_at = 0
    run_training(cut, resume=True)
    a = load_file(str(tmp_path / "whole" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "whole" / "checkpoint.json").read_text())["run"]["history"]
    hb = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["run"]["history"]
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
    a = "".join(generate_text(tiny_model.model, tiny_model.vocab, "KING:\n", 80, temperature=0.8, seed=3))
    b = "".join(generate_text(tiny_model.model, tiny_model.vocab, "KING:\n", 80, temperature=0.8, seed=3))
    c = "".join(generate_text(tiny_model.model, tiny_model.vocab, "KING:\n", 80, temperature=0.8, seed=4))
    assert a == b != c and len(a) == 80 and set(a) <= set(tiny_model.vocab.chars)


def cli(*args, store_root):
    env = dict(os.environ, OMP_NUM_THREADS="1")
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
    expected_text = "".join(generate_text(tiny_model.model, tiny_model.vocab, "ROMEO:", 60, seed=11))  # server defaults
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
              "--no-progress", "--tie-weights", store_root=tmp_path / "store")
    assert out.returncode == 0, out.stderr
    card = store.load("cli", tmp_path / "store").card
    assert card["training"]["command"].startswith("charlstm --store") and "--tie-weights" in card["training"]["command"]
    assert card["config"]["tie_weights"] is True and card["training"]["steps"] == 20
