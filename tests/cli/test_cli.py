"""The `charlstm` command line: lazy sub-commands, --store anywhere, the store's default model,
sampling with the server's defaults and controls, and the unknown-character policy."""

import json
import os
import re
import subprocess
import sys
import textwrap

import httpx
import pytest

from service.model import store
from service.training.evaluate import read_chunks, score_chunks
from ..reference import reference_text
from service.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


BLOCKER = textwrap.dedent("""
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pydantic", "pydantic_settings", "fastapi", "uvicorn", "starlette"):
                raise ImportError(f"{name} is blocked: only the training dependencies are installed")
            return None

    sys.meta_path.insert(0, Blocked())
    from service.cli import main
    code = main(sys.argv[1:])
    assert not [m for m in sys.modules if m.split(".")[0] in ("pydantic", "fastapi", "uvicorn")]
    sys.exit(code)
""")


def run_without_serving(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_training_commands_run_with_only_the_training_dependencies(own_store, play_file, tmp_path):
    text = tmp_path / "val.txt"
    text.write_text(play_file.read_text()[-1500:])
    out = run_without_serving("--store", str(own_store), "evaluate", "--model", "tiny", "--text", str(text), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["chars"] == 1499
    out = run_without_serving("sample", "--store", str(own_store), "--model", "tiny", "--length", "20", "--seed", "1")
    assert out.returncode == 0 and len(out.stdout) == 21, out.stderr
    out = run_without_serving("train", "--text", str(play_file), "--out", str(tmp_path / "lean"), "--store", str(own_store),
                              "--hidden-size", "8", "--embed-dim", "8", "--steps", "4", "--batch-size", "4",
                              "--seq-len", "16", "--eval-every", "0", "--checkpoint-every", "0", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert store.load("lean", own_store).card["training"]["steps"] == 4
    out = run_without_serving("calibrate", "--store", str(own_store), "--model", "tiny@v1", "--text", str(play_file))
    assert out.returncode == 0, out.stderr
    out = run_without_serving("models", "--store", str(own_store))
    assert out.returncode == 0 and "lean@v1" in out.stdout and "tiny@v2" in out.stdout, out.stderr
    out = run_without_serving("--help")
    assert out.returncode == 0 and "serve" in out.stdout, out.stderr
    # and the blocker really blocks: serve needs what is missing
    out = run_without_serving("serve", "--help")
    assert out.returncode != 0 and "blocked" in out.stderr


def test_store_is_accepted_before_and_after_the_sub_command(trained_store):
    before = run("--store", str(trained_store), "models")
    after = run("models", "--store", str(trained_store))
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert "tiny@v1" in before.stdout and before.stdout == after.stdout


def test_models_set_default_marks_it_and_a_bare_model_uses_it(own_store, tiny_model, play_file, tmp_path):
    store.save(tiny_model.model, tiny_model.vocab, {"metrics": {}}, "other", own_store)
    text = tmp_path / "val.txt"
    text.write_text(play_file.read_text()[-500:])
    # no record: the fallback is shakespeare, which this store lacks, and the message says so
    out = run("evaluate", "--store", str(own_store), "--text", str(text))
    assert out.returncode == 2 and "unknown model 'shakespeare'" in out.stderr
    out = run("models", "--store", str(own_store), "--set-default", "other@v1")
    assert out.returncode == 0, out.stderr
    marked = [line for line in out.stdout.splitlines() if line.startswith("* ")]
    assert len(marked) == 1 and "other@v1" in marked[0]
    assert json.loads((own_store / "default.json").read_text()) == {"model": "other@v1"}
    out = run("evaluate", "--store", str(own_store), "--text", str(text))
    assert out.returncode == 0 and out.stdout.startswith("other@v1 on "), out.stderr
    out = run("models", "--store", str(own_store), "--set-default", "nope@v1")
    assert out.returncode == 2 and "of model 'nope'" in out.stderr
    assert store.default_model(own_store) == "other@v1"


def test_train_without_a_name_never_adds_to_an_existing_model(own_store, play_file, tmp_path):
    small = ["--text", str(play_file), "--store", str(own_store), "--hidden-size", "8", "--embed-dim", "8", "--steps", "4",
             "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--no-progress"]
    out = run("train", "--out", str(tmp_path / "shakespeare"), *small)  # the default model's name
    assert out.returncode == 2 and "the store's default model" in out.stderr and "--name" in out.stderr
    out = run("train", "--out", str(tmp_path / "tiny"), *small)  # an existing model
    assert out.returncode == 2 and "already a model in the store" in out.stderr
    assert store.list_versions("tiny", own_store) == ["v1"]
    out = run("train", "--out", str(tmp_path / "fresh-run"), "--set-default", *small)
    assert out.returncode == 0, out.stderr
    assert store.list_versions("fresh-run", own_store) == ["v1"] and store.default_model(own_store) == "fresh-run@v1"
    out = run("train", "--out", str(tmp_path / "again"), "--name", "tiny", *small)  # explicit: a new version
    assert out.returncode == 0 and store.list_versions("tiny", own_store) == ["v1", "v2"], out.stderr
    assert store.default_model(own_store) == "fresh-run@v1"  # unchanged without --set-default


def test_sample_defaults_are_the_servers():
    from service.cli import build_parser

    args = build_parser(["sample"]).parse_args(["sample"])
    d = SamplingParams()
    assert (args.temperature, args.top_k, args.top_p, args.repetition_penalty) == (
        d.temperature, d.top_k, d.top_p, d.repetition_penalty)


@pytest.mark.parametrize("prompt", ["", "KING:\n"])
def test_sample_equals_the_single_stream_reference(trained_store, tiny_model, prompt):
    options = dict(temperature=0.9, top_k=12, top_p=0.95, repetition_penalty=1.3)
    out = run("sample", "--store", str(trained_store), "--model", "tiny", "--prompt", prompt, "--length", "120",
              "--seed", "42", "--temperature", "0.9", "--top-k", "12", "--top-p", "0.95", "--repetition-penalty", "1.3")
    assert out.returncode == 0, out.stderr
    expected = "".join(reference_text(tiny_model.model, tiny_model.vocab, prompt, 120, seed=42, **options))
    assert out.stdout == expected + "\n" and len(expected) == 120


def test_sample_takes_the_servers_constraints(server, trained_store):
    """--regex and --choice run through the engine's constraint control, as structured_outputs does."""
    pattern = r"[A-Z][a-z]+(, [a-z]+)*[.!?]"
    out = run("sample", "--store", str(trained_store), "--model", "tiny", "--prompt", "KING:\n", "--length", "80",
              "--seed", "5", "--regex", pattern)
    served = httpx.post(server.url + "/generate", json={"prompt": "KING:\n", "max_new_tokens": 80, "seed": 5,
                                                        "structured_outputs": {"regex": pattern}}, timeout=30).json()
    assert out.returncode == 0 and out.stdout == served["text"] + "\n", out.stderr
    assert re.fullmatch(pattern, served["text"])
    out = run("sample", "--store", str(trained_store), "--model", "tiny", "--length", "20", "--seed", "2",
              "--choice", "KING", "--choice", "FOOL")
    assert out.returncode == 0 and out.stdout in ("KING\n", "FOOL\n"), out.stderr
    out = run("sample", "--store", str(trained_store), "--model", "tiny", "--regex", "7+")
    assert out.returncode != 0 and "regex" in out.stderr and "Traceback" not in out.stderr


def test_sample_draws_what_the_server_draws(server, trained_store):
    """Empty prompt (the start character), a penalty and stop strings: the same seed, the same text."""
    full = httpx.post(server.url + "/generate", json={"prompt": "", "max_new_tokens": 150, "seed": 8,
                                                      "repetition_penalty": 1.2}, timeout=30).json()["text"]
    out = run("sample", "--store", str(trained_store), "--model", "tiny", "--length", "150", "--seed", "8",
              "--repetition-penalty", "1.2")
    assert out.returncode == 0 and out.stdout == full + "\n", out.stderr
    stop = full[60:63]
    cut = full[: full.index(stop)]
    served = httpx.post(server.url + "/generate", json={"prompt": "", "max_new_tokens": 150, "seed": 8,
                                                        "repetition_penalty": 1.2, "stop": [stop, "never there"]},
                        timeout=30).json()
    assert served["text"] == cut and served["finish_reason"] == "stop"
    out = run("sample", "--store", str(trained_store), "--model", "tiny", "--length", "150", "--seed", "8",
              "--repetition-penalty", "1.2", "--stop", stop, "--stop", "never there")
    assert out.returncode == 0 and out.stdout == cut + "\n", out.stderr


def test_unknown_characters_follow_the_policy(trained_store, tiny_model, tmp_path):
    text = tmp_path / "odd.txt"
    text.write_text("KING: {good} lord, 1597.\nQUEEN: the night.\n")
    vocab = tiny_model.vocab
    odd = sum(1 for c in text.read_text() if c not in vocab)
    assert odd >= 4
    out = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(text))
    assert out.returncode == 2 and "'{' (U+007B) at position 6" in out.stderr
    out = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(text), "--json",
              "--unknown-chars", "skip")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    expected = score_chunks(tiny_model.model, vocab, read_chunks(text), unknown="skip")
    assert got["unknown_chars"] == odd and got["chars"] == len(text.read_text()) - odd - 1
    assert got["nats_per_char"] == pytest.approx(expected.nats_per_char, rel=1e-6)
    assert f"{odd} character(s) outside the vocabulary skipped" in out.stderr
    out = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(text), "--json",
              "--unknown-chars", "replace", "--replacement", " ")
    assert out.returncode == 0 and json.loads(out.stdout)["chars"] == len(text.read_text()) - 1, out.stderr
    assert f"{odd} character(s) outside the vocabulary replaced by ' '" in out.stderr
    out = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(text),
              "--unknown-chars", "replace", "--replacement", "{")
    assert out.returncode == 2 and "replacement must be one character of the vocabulary" in out.stderr
    out = run("sample", "--store", str(trained_store), "--model", "tiny", "--prompt", "KING {1}:", "--length", "30",
              "--seed", "3", "--unknown-chars", "skip")
    skipped = "".join(reference_text(tiny_model.model, vocab, "KING :", 30, seed=3))
    assert out.returncode == 0 and out.stdout == skipped + "\n", out.stderr
    assert "3 character(s) outside the vocabulary skipped" in out.stderr


def test_evaluate_shows_no_progress_bar_off_a_terminal(trained_store, tmp_path, play_file):
    text = tmp_path / "val.txt"
    text.write_text(play_file.read_text()[-3000:])
    out = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(text))
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_evaluate_progress_bar_on_a_terminal(trained_store, tmp_path, play_file):
    """Under a pseudo-terminal the bar shows characters per second; --quiet turns it off."""
    pty = pytest.importorskip("pty")
    fcntl, termios = pytest.importorskip("fcntl"), pytest.importorskip("termios")
    import struct
    text = tmp_path / "val.txt"
    text.write_text(play_file.read_text()[-3000:])
    script = ("import os, sys; from service.cli import main; "
              "sys.exit(main(sys.argv[1:]))")

    def under_pty(*extra):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
        proc = subprocess.Popen([sys.executable, "-c", script, "--store", str(trained_store), "evaluate", "--model",
                                 "tiny", "--text", str(text), *extra], stdout=subprocess.DEVNULL, stderr=slave,
                                cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        os.close(slave)
        seen = b""
        while True:  # read while it runs, so a full terminal buffer never blocks it; EIO once it has exited
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        os.close(master)
        proc.wait(timeout=120)
        return proc, seen.decode(errors="replace")

    proc, bar = under_pty()
    assert proc.returncode == 0 and "char/s" in bar and "3.00k/3.00k" in bar, bar
    proc, bar = under_pty("--quiet")
    assert proc.returncode == 0 and bar == ""


def test_evaluate_scores_the_validation_split_as_training_cut_it(trained_store, tiny_model, tmp_path, play_file):
    fraction = tiny_model.card["corpus"]["split"]["train_fraction"]
    text = play_file.read_text()
    cut = int(len(text) * fraction)
    part = tmp_path / "validation.txt"
    part.write_text(text[cut:])
    split = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(play_file), "--split",
                "validation", "--json")
    whole_file = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(part), "--json")
    assert split.returncode == 0 and whole_file.returncode == 0, split.stderr + whole_file.stderr
    assert json.loads(split.stdout) == json.loads(whole_file.stdout)
    assert json.loads(split.stdout)["chars"] == len(text) - cut - 1
    shown = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(play_file), "--split", "train")
    assert shown.returncode == 0 and "(train split)" in shown.stdout
    other = run("evaluate", "--store", str(trained_store), "--model", "tiny", "--text", str(part), "--split", "validation")
    assert other.returncode == 2 and "is not the text this model was trained on" in other.stderr
