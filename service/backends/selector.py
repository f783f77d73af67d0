"""Which backends exist, how each is built, and which one serves (`--backend auto`).

`auto` measures at start-up, on the loaded model and on this machine, because the answer depends on both
(an AVX2 EPYC and an AVX-512 Xeon with AMX rank the backends differently): each candidate's bare step
(step, logits, the greedy character fed back) at one row and at `max_batch_size` rows for a fraction of
a second, its row guarantee (a row gets the same bits alone as in a batch), and its quality cost against
torch's fp32 step on text the fp32 model samples with a fixed seed (the model's own distribution: the
store keeps no validation text beside a model). A candidate that breaks the row guarantee, or costs more
than `QUALITY_TOLERANCE` bits per character, does not serve; of the rest the one with the best geometric
mean of its speed ratios to the fastest at each of the two sizes does. The figures go to the log and
/info. Imports are lazy, so a missing optional runtime removes only its own backends (vLLM's executor
choice does the same).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import importlib.metadata
import importlib.util

import numpy as np

from ..sampling import softmax
from ..model.store import write_json_atomic
from .base import Backend, kernel_threads, set_kernel_threads
from .fused import tensors_of

log = logging.getLogger("charlstm.backends")

CPU_BACKENDS = ("torch", "torch-int8", "onnx", "onnx-int8")
NAMES = ("auto", *CPU_BACKENDS, "cuda")
QUALITY_TOLERANCE = 0.01  # bits per character a backend may cost against torch fp32
WEIGHTS_BACKEND = {"none": "torch", "int8": "torch-int8"}  # torch's backend for each --quantize value
# measured: benchmarks/README.md. An int8 step of half a batch costs nearly what the whole batch's does (its
# weights, not its rows, are the work), so two shares of one int8 step double its CPU and gain no characters
DEFAULT_STEP_WORKERS = {"torch": 2, "torch-int8": 1, "onnx": 2, "onnx-int8": 1}
TIMING_S = 0.12  # a candidate's bare loop, at each of the two sizes
SAMPLE_ROWS, SAMPLE_LEN = 8, 65  # the quality text: 8 x 64 predictions (the same text for every candidate, so their difference is what it measures)


def build(name: str, model, workers: int | None = None, device="cpu", apart: bool = False, **options) -> Backend:
    """One backend by name, from a `store.LoadedModel` or a torch `CharLSTM`; workers None: its default
    (DEFAULT_STEP_WORKERS). Only the torch backends import torch; `apart`: the ONNX graphs are written in a
    child process, so not even onnx is imported here (a server). options: the cuda backend's (capacity,
    max_steps, and CudaStep's buckets, graphs, pad)."""
    workers = workers or DEFAULT_STEP_WORKERS.get(name, 1)
    if name == "cuda":
        from .cuda import CudaBackend
        return CudaBackend(model, workers, device, **options)
    if options:
        raise TypeError(f"backend {name} takes no options, got {', '.join(options)}")
    if name == "torch":
        from .torch_fp32 import TorchBackend
        return TorchBackend(model, workers, device)
    if name == "torch-int8":
        from .torch_int8 import TorchInt8Backend
        return TorchInt8Backend(model, workers, device)
    if name in ("onnx", "onnx-int8"):
        from .onnx_runtime import OnnxBackend
        return OnnxBackend(model, workers, device, int8=name == "onnx-int8", apart=apart)
    raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {name!r}")


def installed(package: str) -> bool:
    """Whether a package can be imported here, without importing it (torch alone costs 200 MB)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a finder that refuses it (tests/without_torch), or a broken install
        return False


def installed_version(package: str) -> str | None:
    """An installed package's version, from its metadata (without importing it); None where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def available(names: tuple[str, ...] = CPU_BACKENDS) -> tuple[str, ...]:
    """The CPU backends whose runtime is installed (the serving install has no torch)."""
    if not installed("onnxruntime"):
        names = tuple(n for n in names if not n.startswith("onnx"))
    if not installed("torch"):
        names = tuple(n for n in names if not n.startswith("torch"))
    return names


def reference_backend() -> str:
    """The fp32 backend every candidate's quality is measured against: torch's, or ONNX Runtime's fp32
    graph where torch is not installed (the same recurrence in fp32)."""
    return "torch" if installed("torch") else "onnx"


@dataclass
class Trial:
    """One candidate's figures at start-up."""

    name: str
    chars_per_s: dict[int, float] = field(default_factory=dict)  # batch size -> bare loop chars/s
    bits_cost: float | None = None  # bits per char against torch fp32 on the model's own sample
    build_s: float = 0.0
    dropped: str | None = None  # why it does not serve

    def as_dict(self) -> dict:
        return {"name": self.name, "chars_per_s": {str(b): round(v) for b, v in self.chars_per_s.items()},
                "bits_cost": None if self.bits_cost is None else round(self.bits_cost, 5),
                "build_s": round(self.build_s, 3), "dropped": self.dropped}

    @classmethod
    def from_dict(cls, d: dict) -> Trial:
        return cls(d["name"], {int(b): float(v) for b, v in d["chars_per_s"].items()}, d["bits_cost"], d["build_s"],
                   d["dropped"])


@dataclass
class Choice:
    backend: Backend
    trials: list[Trial]
    remembered: bool = False  # found in the backend cache rather than measured at this start
    measured_at: float | None = None

    def as_dict(self) -> dict:
        return {"chosen": self.backend.name, "trials": [t.as_dict() for t in self.trials], "remembered": self.remembered,
                "measured_at": self.measured_at}


def bare_loop(backend: Backend, batch: int, seconds: float = TIMING_S) -> float:
    """chars/s of step + logits + the greedy character fed back, `batch` rows, for about `seconds`."""
    state, ids = backend.zero_state(batch), np.zeros(batch, dtype=np.int64)
    state = backend.step(ids, state)  # warm-up: first calls allocate
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < seconds:
        ids = backend.logits(state).argmax(1)
        state = backend.step(ids, state)
        steps += 1
    return batch * steps / (time.perf_counter() - t0)


def keeps_rows(backend: Backend, batch: int) -> bool:
    """Whether each row's next state and logits are the same bits alone as in a batch of `batch`
    (and of 3) random rows: what padding and shares must give, checked on the backend itself."""
    gen = np.random.default_rng(1)
    state = gen.random((2, backend.num_layers, batch, backend.hidden), dtype=np.float32) * 2 - 1  # (2, L, B, H)
    ids = gen.integers(0, backend.vocab_size, batch)  # (B,) int64
    together = backend.step(ids, state)
    logits = backend.logits(together)
    small = backend.step(ids[:3], state[:, :, :3])
    if not np.array_equal(small, together[:, :, :3]) or not np.array_equal(backend.logits(small), logits[:3]):
        return False
    for row in (0, batch - 1):
        alone = backend.step(ids[row : row + 1], state[:, :, row : row + 1])
        if not np.array_equal(alone, together[:, :, row : row + 1]) or not np.array_equal(backend.logits(alone), logits[row : row + 1]):
            return False
    return True


def model_sample(reference: Backend, rows: int = SAMPLE_ROWS, length: int = SAMPLE_LEN, seed: int = 0) -> np.ndarray:
    """(rows, length) ids the fp32 model samples at temperature 1 from a fixed seed."""
    gen = np.random.default_rng(seed)
    ids = gen.integers(0, reference.vocab_size, rows)  # (R,) int64
    state, out = reference.zero_state(rows), [ids]
    for _ in range(length - 1):
        state = reference.step(ids, state)
        cdf = np.cumsum(softmax(reference.logits(state)), axis=1, dtype=np.float64)  # (R, V)
        ids = np.minimum((cdf <= gen.random((rows, 1)) * cdf[:, -1:]).sum(axis=1), reference.vocab_size - 1)  # (R,)
        out.append(ids)
    return np.stack(out, axis=1)


def choose(model, candidates: tuple[str, ...], max_batch_size: int, workers: int | None = None) -> Choice:
    """Build, check and time each candidate; return the fastest that keeps the guarantees (the others
    are closed). The fp32 reference (`reference_backend`) is every candidate's yardstick, served only if chosen."""
    from .quality import bits_per_char_rows

    candidates = tuple(n for n in available(candidates))
    if not candidates:
        raise ValueError("no backend is available to choose from")
    reference_name = reference_backend()
    reference = build(reference_name, model, workers)
    text = model_sample(reference)
    reference_bits = bits_per_char_rows(reference, text)
    sizes = sorted({1, max_batch_size})
    trials, built = [], {}
    for name in candidates:
        trial = Trial(name)
        trials.append(trial)
        t0 = time.perf_counter()
        try:
            backend = reference if name == reference_name else build(name, model, workers)
        except Exception as e:  # a runtime that cannot build this model here: not served, said why
            trial.dropped = f"could not be built: {e}"
            log.warning("backend %s %s", name, trial.dropped)
            continue
        trial.build_s = time.perf_counter() - t0
        built[name] = backend
        trial.bits_cost = bits_per_char_rows(backend, text) - reference_bits
        if not keeps_rows(backend, max(4, max_batch_size)):
            trial.dropped = "a row's bits depend on its batch"
        elif trial.bits_cost > QUALITY_TOLERANCE:
            trial.dropped = f"costs {trial.bits_cost:.4f} bits/char (> {QUALITY_TOLERANCE})"
    for size in sizes:  # interleaved by size, so a drift of the host's speed touches every candidate alike
        for trial in trials:
            if trial.name in built:
                trial.chars_per_s[size] = bare_loop(built[trial.name], size)
    serving = [t for t in trials if t.dropped is None and t.name in built]
    if not serving:
        raise ValueError("no backend keeps the guarantees here: " + "; ".join(f"{t.name}: {t.dropped}" for t in trials))
    best = {size: max(t.chars_per_s[size] for t in serving) for size in sizes}

    def score(t: Trial) -> float:
        return math.prod(t.chars_per_s[s] / best[s] for s in sizes) ** (1 / len(sizes))

    winner = max(serving, key=score)
    for name, backend in built.items():
        if name != winner.name and backend is not reference:
            backend.close()
    if winner.name != reference_name:
        reference.close()
    choice = Choice(built[winner.name], trials)
    log_choice(choice)
    return choice


def log_choice(choice: Choice) -> None:
    for t in choice.trials:
        log.info("backend %-10s %s bits/char cost %s, built in %.2fs%s", t.name,
                 ", ".join(f"B={s}: {v:,.0f} chars/s" for s, v in t.chars_per_s.items()),
                 "?" if t.bits_cost is None else f"{t.bits_cost:+.4f}", t.build_s,
                 f"; dropped: {t.dropped}" if t.dropped else " <- serves" if t.name == choice.backend.name else "")


# ---------------------------------------------------------------- auto without its trials' memory
# The trials build every candidate; what they allocate is not given back to the OS (156 MB measured). So
# `auto` measures in a child process and builds only the winner here, and it remembers the winner beside the
# key of everything the answer depends on: a start on the same weights, machine, runtimes and code finds it.

def machine_key() -> dict:
    """What a backend's speed on this machine depends on, besides the weights and the settings."""
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in cpu:
                cpu[key.strip()] = value.strip()
    except OSError:
        cpu["processor"] = platform.processor()
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):  # this package's code: a change re-measures
        code.update(path.read_bytes())
    return {"cpu": cpu.get("model name", cpu.get("processor", "?")),
            "flags": hashlib.sha256(cpu.get("flags", "").encode()).hexdigest()[:16],
            "cores": len(os.sched_getaffinity(0)), "threads": kernel_threads(), "torch": installed_version("torch"),
            "onnxruntime": installed_version("onnxruntime"), "numpy": np.__version__, "python": platform.python_version(),
            "backends_code": code.hexdigest()[:16]}


def choice_key(fingerprint: str, candidates: tuple[str, ...], max_batch_size: int, workers: int | None) -> str:
    what = {"weights": fingerprint, "candidates": list(candidates), "max_batch_size": max_batch_size, "workers": workers,
            **machine_key()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _choose_here(model, candidates: tuple[str, ...], max_batch_size: int, workers: int | None,
                 threads: int) -> dict:
    """`choose` in the child process: the figures, and every candidate closed."""
    set_kernel_threads(threads)
    choice = choose(model, candidates, max_batch_size, workers)
    choice.backend.close()
    return choice.as_dict()


def choose_apart(model, candidates: tuple[str, ...], max_batch_size: int, workers: int | None) -> dict:
    """`choose`'s figures, measured in a child process (spawned: no copy of this process's threads).
    The child gets the model's config and numpy tensors, so it imports torch only for torch candidates."""
    config, tensors = tensors_of(model)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(_choose_here, _Weights(config, tensors), candidates, max_batch_size, workers,
                            kernel_threads()).result()


@dataclass
class _Weights:
    """What a backend is built from (`fused.tensors_of`), as the child process receives it."""

    config: object
    tensors: dict

    @property
    def model(self):  # a torch backend on a GPU ingests with the torch module (torch_fp32.py)
        from ..model.store import module_from
        return module_from(self.config, self.tensors)


def _remembered(cache: Path) -> dict:
    """Every choice the file holds, by key; none where it is missing or unreadable."""
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def remember_choice(cache: Path, key: str, figures: dict, keep: int = 32) -> None:
    """Add this choice to the file (the `keep` newest kept); a file that cannot be written is only logged."""
    try:
        known = {**_remembered(cache), key: figures}
        newest = sorted(known.items(), key=lambda kv: kv[1].get("measured_at", 0), reverse=True)[:keep]
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, dict(newest))
    except OSError as e:
        log.warning("could not remember the backend choice in %s (%s): the next start measures again", cache, e)


def auto_choice(model, candidates: tuple[str, ...], max_batch_size: int, workers: int | None,
                fingerprint: str | None, cache: Path | None) -> Choice:
    """`auto`: the winner remembered for this key, else measured apart (and remembered); only it is built here."""
    key = choice_key(fingerprint, candidates, max_batch_size, workers) if fingerprint and cache is not None else None
    figures = _remembered(cache).get(key) if key else None
    remembered = figures is not None
    if figures is None:
        figures = {**choose_apart(model, candidates, max_batch_size, workers), "measured_at": time.time()}
        if key:
            remember_choice(cache, key, figures)
    trials = [Trial.from_dict(t) for t in figures["trials"]]
    choice = Choice(build(figures["chosen"], model, workers, apart=True), trials, remembered, figures["measured_at"])
    if remembered:
        log.info("backend %s: the choice measured at %s on this machine, weights and code", choice.backend.name,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(choice.measured_at)))
    log_choice(choice)
    return choice


DEFAULT_DECODE_STEPS = {"cpu": 1, "cuda": 16}  # a GPU pays a copy and a sync per look, the CPU does not


@dataclass
class Serving:
    """What the server steps with: the backend (on a GPU the cuda backend, its graphs captured), the steps
    a look, a name for the log, the choice made."""

    backend: Backend
    decode_steps: int
    device_name: str
    choice: Choice | None = None


def for_serving(model, backend: str = "auto", quantize: str | None = None, device: str = "cpu",
                max_batch_size: int = 64, step_workers: int | None = None, decode_steps: int | None = None,
                fingerprint: str | None = None, cache: Path | None = None, apart: bool = False) -> Serving:
    """The backend the settings ask for: `cuda` (or `auto` on a device that resolves to a GPU) captures
    CUDA graphs; a named CPU backend is built; `auto` on the CPU is `choose` among the CPU backends with
    the weights `quantize` names (any when unset). int8 is a CPU kernel, so device auto with it is the CPU."""
    wanted = "cuda" if backend == "cuda" else "cpu" if device == "auto" and (quantize == "int8" or backend != "auto") else device
    if wanted == "auto" and not installed("torch"):  # CUDA runs through torch: the serving install has none
        wanted = "cpu"
    if wanted != "cpu" and not installed("torch"):
        raise ValueError(f"device {wanted} needs torch, which this install lacks: install charlstm with torch (README)")
    where = "cpu"
    if wanted != "cpu":
        from .cuda import resolve_device
        where = resolve_device(wanted).type
    steps = decode_steps or DEFAULT_DECODE_STEPS[where]
    if where == "cuda":
        import torch

        from .cuda import resolve_device
        cuda = build("cuda", model, device=resolve_device(wanted), capacity=max_batch_size, max_steps=steps)
        return Serving(cuda, steps, f"{cuda.device} ({torch.cuda.get_device_name(cuda.device)}, CUDA graphs, {steps} steps a look)")
    if backend != "auto":
        return Serving(build(backend, model, step_workers, apart=apart), steps, "cpu")
    kinds = {"none": "fp32", "int8": "int8", None: None}[quantize]
    candidates = tuple(n for n in CPU_BACKENDS if kinds is None or (n.endswith("int8") == (kinds == "int8")))
    if apart:  # a server: the trials in a child process, the choice remembered in `cache` for `fingerprint`'s weights
        choice = auto_choice(model, candidates, max_batch_size, step_workers, fingerprint, cache)
    else:
        choice = choose(model, candidates, max_batch_size, step_workers)
    return Serving(choice.backend, steps, "cpu", choice)
