"""The model store: versioned models as safetensors weights plus a JSON card, on disk.

Layout: <root>/<name>/<version>/{model.safetensors, card.json, loss.png}, and <root>/default.json naming
the store's default model. A model is addressed as `name` (its newest version), `name@version`, or a
path to a model folder. Loading executes nothing
from the files: weights are safetensors, metadata is JSON, and the card is checked against the
tensors (names, shapes, dtypes, vocabulary, checksum) before a model is built. Every failure is one
`ModelLoadError` whose message names what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from .config import CharLSTMConfig, tensor_shapes
from .vocab import CharVocab

if TYPE_CHECKING:
    import torch

    from .network import CharLSTM

CARD_FORMAT = "charlstm-model/1"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
PLOT_FILE = "loss.png"
DEFAULT_STORE = Path(__file__).resolve().parents[2] / "model_store"  # beside the service package
DEFAULT_MODEL = "shakespeare"  # the default when the store records none
DEFAULT_FILE = "default.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^v(\d{1,9})$")
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}  # numpy's or torch's name -> the file's


class ModelLoadError(Exception):
    """The one error a caller of the store sees: the message says what is wrong and where."""


@dataclass
class LoadedModel:
    """A checked model: its tensors as numpy arrays (no torch needed to serve it), the torch module
    built from them only when something asks for `model` (training tools, the torch backends)."""

    tensors: dict[str, np.ndarray] | None  # name -> fp32 array, as stored; None after `drop_module`
    vocab: CharVocab
    card: dict
    path: Path
    config: CharLSTMConfig
    num_parameters: int = field(init=False)
    _module: CharLSTM | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.num_parameters = sum(int(a.size) for a in self.tensors.values())  # a tied matrix is stored once

    @property
    def model(self) -> CharLSTM:
        """The torch module (eval mode, CPU), built on first use: this imports torch."""
        if self._module is None:
            if self.tensors is None:
                raise RuntimeError(f"{self.path}: the weights were let go (drop_module): the serving backend holds its own copy")
            self._module = module_from(self.config, self.tensors)
        return self._module

    def drop_module(self) -> None:
        """Let the fp32 weights go: a backend that built its own copy (ONNX Runtime's sessions) needs
        none of them, and they are 4 bytes a parameter."""
        self.tensors, self._module = None, None

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]


def store_root(root: str | Path | None = None) -> Path:
    """The store's folder: `root`, else the repository's. The environment (CHARLSTM_MODEL_STORE) is read by
    the caller's settings, once: the server's `Settings`, the command line's --store."""
    return Path(root or DEFAULT_STORE).resolve()


def check_name(kind: str, value: str) -> str:
    """Names and versions are plain tokens, so a request can never address a path outside the store."""
    pattern = _NAME if kind == "name" else _VERSION
    if not isinstance(value, str) or not pattern.match(value) or value in (".", ".."):
        hint = "letters, digits, '.', '_' or '-'" if kind == "name" else "'v' and a number, e.g. v1"
        raise ModelLoadError(f"invalid model {kind} {value!r}: expected {hint}")
    return value


def list_versions(name: str, root: str | Path | None = None) -> list[str]:
    folder = store_root(root) / check_name("name", name)
    if not folder.is_dir():
        return []
    versions = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(versions, key=lambda v: int(v[1:]))


def list_models(root: str | Path | None = None) -> list[tuple[str, str, dict | None]]:
    """Every (name, version, card or None when unreadable) in the store, sorted."""
    base = store_root(root)
    out = []
    if not base.is_dir():
        return out
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and _NAME.match(p.name)):
        for version in list_versions(folder.name, base):
            try:
                card = read_card(folder / version)
            except ModelLoadError:
                card = None
            out.append((folder.name, version, card))
    return out


def resolve(ref: str, root: str | Path | None = None, allow_paths: bool = True) -> Path:
    """Turn `name`, `name@version` or (when `allow_paths`) a model folder into the folder of the model.

    References that come from a network request pass `allow_paths=False`: only store names then.
    """
    if not isinstance(ref, str) or not ref:
        raise ModelLoadError("model reference is empty: give a name, name@version or a model folder")
    if allow_paths and ("/" in ref or os.sep in ref or ref.startswith(".")):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {ref!r} does not exist")
        return folder.resolve()
    name, _, version = ref.partition("@")
    check_name("name", name)
    base = store_root(root)
    if version:
        check_name("version", version)
        folder = base / name / version
        if not folder.is_dir():
            known = ", ".join(list_versions(name, base)) or "none"
            raise ModelLoadError(f"unknown version {version!r} of model {name!r} (versions in store: {known})")
    else:
        versions = list_versions(name, base)
        if not versions:
            known = ", ".join(sorted({n for n, _, _ in list_models(base)})) or "none"
            raise ModelLoadError(f"unknown model {name!r} in store {base} (models: {known})")
        folder = base / name / versions[-1]
    folder = folder.resolve()
    if base not in folder.parents:
        raise ModelLoadError(f"model reference {ref!r} points outside the model store")
    return folder


def default_model(root: str | Path | None = None) -> str:
    """The store's default model reference (`name` or `name@version`): what `default.json` records,
    or DEFAULT_MODEL when it records nothing. Changed only by `set_default`."""
    path = store_root(root) / DEFAULT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return DEFAULT_MODEL
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    ref = record.get("model") if isinstance(record, dict) else None
    if not isinstance(ref, str):
        raise ModelLoadError(f"{path} does not name a model: expected {{\"model\": \"name@version\"}}")
    name, _, version = ref.partition("@")
    check_name("name", name)
    if version:
        check_name("version", version)
    return ref


def set_default(ref: str, root: str | Path | None = None) -> str:
    """Record `ref` (a model in this store, `name` or `name@version`) as the store's default, atomically."""
    folder = resolve(ref, root, allow_paths=False)  # exists, and names no path
    if not (folder / CARD_FILE).is_file():
        raise ModelLoadError(f"model at {folder} is incomplete: missing {CARD_FILE}")
    write_json_atomic(store_root(root) / DEFAULT_FILE, {"model": ref})
    return ref


def is_default(name: str, version: str, root: str | Path | None = None) -> bool:
    """Whether name@version is what the store's default reference resolves to."""
    try:
        return resolve(default_model(root), root, allow_paths=False) == (store_root(root) / name / version).resolve()
    except ModelLoadError:
        return False


def attach_plot(folder: Path, plot: Path) -> None:
    """Add the loss plot to a saved model's folder (optional: the card and weights do not depend on it)."""
    tmp = folder / f".{PLOT_FILE}.{uuid.uuid4().hex}.tmp"
    shutil.copyfile(plot, tmp)
    os.replace(tmp, folder / PLOT_FILE)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def module_from(config: CharLSTMConfig, tensors: dict[str, np.ndarray]) -> CharLSTM:
    """The torch module of these tensors, in eval mode on the CPU."""
    import torch

    from .network import CharLSTM

    model = CharLSTM(config)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, strict=not config.tie_weights)
    return model.eval()


def weights_of(model: CharLSTM) -> dict[str, torch.Tensor]:
    """The tensors to store: a tied head shares the embedding and is not written twice."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        tensors.pop("head.weight")
    return tensors


def tensor_manifest(tensors: dict) -> dict[str, dict]:
    """name -> shape and dtype (the file's name for it) of numpy arrays or torch tensors."""
    return {k: {"shape": list(t.shape), "dtype": _DTYPE_NAMES[str(t.dtype).removeprefix("torch.")]}
            for k, t in sorted(tensors.items())}


def expected_manifest(config: CharLSTMConfig) -> dict[str, dict]:
    """The manifest a model of this architecture has: fp32 tensors of `model_config.tensor_shapes`."""
    return {k: {"shape": shape, "dtype": "F32"} for k, shape in sorted(tensor_shapes(config).items())}


def load(ref: str, root: str | Path | None = None, allow_paths: bool = True) -> LoadedModel:
    """Find, validate and build a model for inference (eval mode, CPU)."""
    folder = resolve(ref, root, allow_paths)
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    for p in (card_path, weights_path):
        if not p.is_file():
            raise ModelLoadError(f"model at {folder} is incomplete: missing {p.name}")
    card = read_card(folder)
    try:
        config = CharLSTMConfig.from_dict(card["config"])
        vocab = CharVocab(card["vocab"])
        manifest = card["tensors"]
        expected_sha = card["weights_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{card_path} is malformed: {type(e).__name__}: {e}") from None
    if len(vocab) != config.vocab_size:
        raise ModelLoadError(f"{card_path}: vocabulary has {len(vocab)} characters but config.vocab_size is {config.vocab_size}")

    actual_sha = file_sha256(weights_path)
    if actual_sha != expected_sha:
        raise ModelLoadError(f"{weights_path} is corrupt or truncated: sha256 {actual_sha[:12]}... does not match the card's {str(expected_sha)[:12]}...")
    unreadable = (SafetensorError, OSError, ValueError, RuntimeError, TypeError)  # TypeError: a dtype numpy lacks (BF16)
    try:
        with safe_open(str(weights_path), framework="np") as f:
            header = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()} for k in f.keys()}
    except unreadable as e:
        raise ModelLoadError(f"{weights_path} is not a readable safetensors file: {e}") from None

    expected = expected_manifest(config)
    for label, got in (("card", manifest), ("weights file", header)):
        if got != expected:
            raise ModelLoadError(f"{label} of {folder} does not match the architecture in the card: {describe_mismatch(expected, got)}")
    try:  # only once the header says fp32 tensors of the right shapes
        tensors = load_file(str(weights_path))
    except unreadable as e:
        raise ModelLoadError(f"{weights_path} is not a readable safetensors file: {e}") from None
    return LoadedModel(tensors=tensors, vocab=vocab, card=card, path=folder, config=config)


def read_card(folder: Path) -> dict:
    """A model folder's card, checked to be one (its tensors are checked by `load`)."""
    card_path = folder / CARD_FILE
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{card_path} is not valid JSON: {e}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ModelLoadError(f"{card_path} is not a charlstm model card (expected format {CARD_FORMAT!r})")
    return card


def describe_mismatch(expected: dict, got: dict) -> str:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        return f"missing tensors {missing}"
    if extra:
        return f"unexpected tensors {extra}"
    for k in sorted(expected):
        if expected[k] != got[k]:
            return f"tensor {k!r} is {got[k]['dtype']}{got[k]['shape']}, expected {expected[k]['dtype']}{expected[k]['shape']}"
    return "no difference"


def save(model: CharLSTM, vocab: CharVocab, card: dict, name: str, root: str | Path | None = None,
         plot: Path | None = None) -> Path:
    """Write a new version atomically: build it in a hidden folder, rename it into place, reload, compare."""
    check_name("name", name)
    base = store_root(root)
    parent = base / name
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    from safetensors.torch import save_file

    try:
        tensors = weights_of(model)
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        os.chmod(tmp / WEIGHTS_FILE, 0o644)  # a model is read by the serving user, whoever wrote it
        existing = list_versions(name, base)
        version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
        full_card = {
            "format": CARD_FORMAT,
            "name": name,
            "version": version,
            **card,
            "config": model.config.to_dict(),
            "vocab": vocab.chars,
            "num_parameters": model.num_parameters(),
            "tensors": tensor_manifest(tensors),
            "weights_sha256": file_sha256(tmp / WEIGHTS_FILE),
        }
        write_json_atomic(tmp / CARD_FILE, full_card)
        if plot is not None and plot.is_file():
            shutil.copyfile(plot, tmp / PLOT_FILE)
        _fsync_dir(tmp)
        final = parent / version
        os.rename(tmp, final)  # fails rather than overwrite if the version appeared meanwhile
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    reloaded = load(str(final))
    for k, t in tensors.items():
        if not np.array_equal(reloaded.tensors[k], t.float().numpy()):
            raise ModelLoadError(f"{final}: tensor {k!r} differs after reload")
    return final


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
