"""Shared fixtures: a small synthetic play and a tiny model really trained on it, once per session."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from service.model import store
from service.backends.base import set_kernel_threads
from service.training.train import TrainConfig, run_training

from .redis_server import RedisServer
from .server import Server

# The tests' models are tiny: one thread a kernel is as fast and leaves a core free. Torch's (service.training.train
# has loaded it) and ONNX Runtime's, for every backend the tests build in this process.
set_kernel_threads(1)

# What a test reaches, in its own body or through its fixtures: a real server (a subprocess, an in-process
# uvicorn, a browser) marks it `http`; a command run in a process of its own (`charlstm ...`), `cli`.
# `make test-fast` runs the others: the unit and contract tests.
_REACHES = {"http": ("Server(", "InProcessServer(", "tree_server(", "launch("),
            "cli": ("subprocess.run(", "subprocess.Popen(", "run_cli(", "sys.executable")}


def _reaches(func, seen: dict, depth: int = 1) -> frozenset:
    """The marks a function's source calls for, its module's own helpers that it calls included (one level)."""
    if func not in seen:
        import ast
        import inspect
        import textwrap

        try:
            source = textwrap.dedent(inspect.getsource(func))
        except (OSError, TypeError):
            source = ""
        marks = {mark for mark, signs in _REACHES.items() if any(sign in source for sign in signs)}
        if depth and source:
            module = inspect.getmodule(func)
            for node in ast.walk(ast.parse(source)):
                helper = getattr(module, node.func.id, None) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
                if inspect.isfunction(helper) and helper is not func:
                    marks |= _reaches(helper, seen, depth - 1)
        seen[func] = frozenset(marks)
    return seen[func]


LAYERS = ("unit", "contracts")  # folders whose name is also a mark; http, cli and tools come from what a test reaches


def pytest_collection_modifyitems(config, items):
    seen: dict = {}
    for item in items:
        if item.path.parent.name in LAYERS:
            item.add_marker(getattr(pytest.mark, item.path.parent.name))
        info = getattr(item, "_fixtureinfo", None)
        funcs = [getattr(item, "function", None)]
        if info is not None:
            funcs += [d.func for name in info.names_closure for d in info.name2fixturedefs.get(name, ())]
        for mark in frozenset().union(*(_reaches(f, seen) for f in funcs if f is not None)):
            item.add_marker(getattr(pytest.mark, mark))


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
