"""Shared fixtures: a small synthetic play and a tiny model really trained on it, once per session."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from service import store
from service.backends.base import set_kernel_threads
from service.train import TrainConfig, run_training

from .redis_server import RedisServer
from .server import Server

# The tests' models are tiny: one thread a kernel is as fast and leaves a core free. Torch's (service.train
# has loaded it) and ONNX Runtime's, for every backend the tests build in this process.
set_kernel_threads(1)

SPEAKERS = ["KING", "QUEEN", "ROMEO", "JULIET", "FOOL", "GHOST"]
WORDS = ("thou thee thy my lord lady love death night day sweet good fair noble heart sword crown "
         "grave heaven fate doth hath art shall will not is the a of and to in what wherefore").split()


def make_play(chars: int, seed: int = 0) -> str:
    """A deterministic, learnable stand-in for a play: speaker lines, verse, punctuation."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        block = [f"{rng.choice(SPEAKERS)}:"]
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
            words[0] = words[0].capitalize()
            block.append(" ".join(words) + rng.choice([",", ".", "!", "?", ";"]))
        text = "\n".join(block) + "\n\n"
        out.append(text)
        size += len(text)
    return "".join(out)[:chars]


def tiny_config(text: Path, out: Path, store_root: Path, **overrides) -> TrainConfig:
    values = dict(text=str(text), out=str(out), store=str(store_root), name="tiny", embed_dim=32, hidden_size=32,
                  num_layers=2, dropout=0.1, batch_size=8, seq_len=32, steps=120, lr=1e-2, min_lr=1e-3,
                  warmup_steps=10, eval_every=40, checkpoint_every=40, eval_streams=4, seed=7, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server for one test module (test_replicas starts its own, with the append-only file)."""
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def play_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(make_play(24_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory, play_file) -> Path:
    """A model store holding tiny@v1, trained in this session."""
    root = tmp_path_factory.mktemp("store")
    run_training(tiny_config(play_file, root.parent / "tiny-run", root))
    return root


@pytest.fixture
def own_store(trained_store, tmp_path):
    """A private copy of the trained store that a test may change (a second model, a default)."""
    root = tmp_path / "store"
    shutil.copytree(trained_store, root)
    return root


@pytest.fixture(scope="session")
def tiny_model(trained_store) -> store.LoadedModel:
    return store.load("tiny", trained_store)


@pytest.fixture(scope="session")
def server(trained_store):
    """The service on the tiny model with default limits."""
    srv = Server(trained_store, max_new_tokens=100_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def small_server(trained_store):
    """Two rows, one queue place, three sessions: limits that a test can reach."""
    srv = Server(trained_store, max_batch_size=2, max_queue=1, max_sessions=3, max_new_tokens=1_000_000,
                 max_body_bytes=4096)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chat_server(trained_store):
    """The tiny model's vocabulary has no Z, so the default speakers (FIRST CITIZEN) cannot be written: KING asks."""
    srv = Server(trained_store, max_new_tokens=100_000, chat_user_speaker="KING", chat_assistant_speaker="ROMEO")
    yield srv
    srv.stop()
