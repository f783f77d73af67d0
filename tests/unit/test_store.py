"""The model store: atomic versioned saves, and one clear error for every way a model can be broken."""

import json
import shutil

import numpy as np
import pytest
import torch

from service.model import store
from service.model.network import CharLSTM, CharLSTMConfig
from service.model.vocab import CharVocab


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """A private copy of the trained model's folder that a test may damage."""
    root = tmp_path / "store"
    shutil.copytree(tiny_model.path, root / "tiny" / "v1")
    return root, root / "tiny" / "v1"


def test_trained_model_round_trips_with_a_complete_card(tiny_model):
    card = tiny_model.card
    for key in ("vocab", "config", "num_parameters", "corpus", "training", "metrics", "created_at", "tensors"):
        assert key in card
    assert card["corpus"]["split"]["train_fraction"] == 0.9 and len(card["corpus"]["sha256"]) == 64
    assert card["training"]["command"] and card["training"]["torch_version"] == torch.__version__
    assert card["training"]["steps"] == 120 and card["training"]["wall_time_s"] > 0
    assert card["num_parameters"] == tiny_model.num_parameters == tiny_model.model.num_parameters()
    assert tiny_model.config == tiny_model.model.config == CharLSTMConfig.from_dict(card["config"])
    assert (tiny_model.path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not tiny_model.model.training


def test_save_is_a_new_version_and_reloads_equal(tiny_model, tmp_path):
    root = tmp_path / "s"
    first = store.save(tiny_model.model, tiny_model.vocab, {}, "copy", root)
    second = store.save(tiny_model.model, tiny_model.vocab, {}, "copy", root)
    assert (first.name, second.name) == ("v1", "v2")
    assert store.resolve("copy", root) == second and store.resolve("copy@v1", root) == first
    assert not [p for p in (root / "copy").iterdir() if p.name.startswith(".")]  # no temporary left behind
    loaded = store.load(str(first))
    stored = store.weights_of(tiny_model.model)
    assert loaded.tensors.keys() == stored.keys()
    for k, v in stored.items():  # the arrays as stored: numpy float32, bit for bit the module's
        assert isinstance(loaded.tensors[k], np.ndarray) and loaded.tensors[k].dtype == np.float32, k
        assert np.array_equal(loaded.tensors[k], v.numpy()), k
    assert loaded.model is loaded.model  # the module is built once, on first use
    for k, v in tiny_model.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_tied_model_is_written_once_and_rebuilt_tied(tmp_path):
    model = CharLSTM(CharLSTMConfig(vocab_size=3, embed_dim=8, hidden_size=8, tie_weights=True))
    path = store.save(model, CharVocab("abc"), {}, "tied", tmp_path)
    card = json.loads((path / "card.json").read_text())
    assert "head.weight" not in card["tensors"]
    assert "head.weight" not in store.load("tied", tmp_path).tensors
    loaded = store.load("tied", tmp_path).model
    assert loaded.head.weight is loaded.embed.weight and torch.equal(loaded.head.weight, model.embed.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_the_expected_manifest_is_the_torch_modules(tie):
    """What `load` checks a card and a file against, computed without torch, is what the module stores."""
    for layers in (1, 3):
        config = CharLSTMConfig(vocab_size=7, embed_dim=12, hidden_size=12 if tie else 10, num_layers=layers, tie_weights=tie)
        assert store.expected_manifest(config) == store.tensor_manifest(store.weights_of(CharLSTM(config)))


@pytest.mark.parametrize("missing", ["card.json", "model.safetensors"])
def test_missing_file(model_copy, missing):
    root, folder = model_copy
    (folder / missing).unlink()
    with pytest.raises(store.ModelLoadError, match=f"incomplete: missing {missing}"):
        store.load("tiny", root)


def test_corrupt_weights_fail_the_checksum(model_copy):
    root, folder = model_copy
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(store.ModelLoadError, match="corrupt or truncated"):
        store.load("tiny", root)


def test_truncated_weights_fail_even_with_a_matching_checksum(model_copy):
    root, folder = model_copy
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    card = json.loads((folder / "card.json").read_text())
    card["weights_sha256"] = store.file_sha256(weights)
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(store.ModelLoadError, match="not a readable safetensors file"):
        store.load("tiny", root)


def test_wrong_shapes_named(model_copy):
    root, folder = model_copy
    card = json.loads((folder / "card.json").read_text())
    card["config"]["hidden_size"] = 40
    card["config"]["embed_dim"] = 40
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(store.ModelLoadError, match=r"does not match the architecture.*tensor 'embed.weight'"):
        store.load("tiny", root)


def test_vocabulary_size_mismatch(model_copy):
    root, folder = model_copy
    card = json.loads((folder / "card.json").read_text())
    card["vocab"] = card["vocab"][:-1]
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(store.ModelLoadError, match="vocabulary has"):
        store.load("tiny", root)


def test_card_not_json(model_copy):
    root, folder = model_copy
    (folder / "card.json").write_text("{not json")
    with pytest.raises(store.ModelLoadError, match="not valid JSON"):
        store.load("tiny", root)


def test_unknown_version_and_name(model_copy):
    root, _ = model_copy
    with pytest.raises(store.ModelLoadError, match=r"unknown version 'v9' of model 'tiny' \(versions in store: v1\)"):
        store.load("tiny@v9", root)
    with pytest.raises(store.ModelLoadError, match="unknown model 'nope'"):
        store.load("nope", root)


@pytest.mark.parametrize("ref", ["..", "../tiny", "tiny@..", "tiny@../../etc", "tiny@v1/../../x", "/etc", "ti ny",
                                 "@v1", "tiny@1", "%2e%2e", "tiny@v1@v1", ".hidden"])
def test_store_references_cannot_leave_the_store(model_copy, ref):
    root, _ = model_copy
    with pytest.raises(store.ModelLoadError, match="invalid model"):
        store.load(ref, root, allow_paths=False)


def test_a_folder_reference_loads_when_paths_are_allowed(model_copy):
    _, folder = model_copy
    assert store.load(str(folder)).version == "v1"
    with pytest.raises(store.ModelLoadError, match="does not exist"):
        store.load(str(folder / "nope"))


def test_the_default_model_is_recorded_in_the_store(model_copy, tiny_model):
    root, _ = model_copy
    assert store.default_model(root) == store.DEFAULT_MODEL == "shakespeare"  # no record yet
    assert not store.is_default("tiny", "v1", root)
    store.save(tiny_model.model, tiny_model.vocab, {}, "tiny", root)  # tiny@v2
    assert store.set_default("tiny@v1", root) == "tiny@v1"
    assert store.default_model(root) == "tiny@v1"
    assert store.is_default("tiny", "v1", root) and not store.is_default("tiny", "v2", root)
    assert store.load(store.default_model(root), root).version == "v1"
    store.set_default("tiny", root)  # a bare name: its newest version
    assert store.is_default("tiny", "v2", root) and not store.is_default("tiny", "v1", root)
    assert [p.name for p in root.iterdir() if p.is_file()] == ["default.json"]  # written atomically, no temporaries


@pytest.mark.parametrize("ref, message", [("nope", "unknown model 'nope'"), ("tiny@v4", "unknown version 'v4'"),
                                          ("../tiny", "invalid model name"), ("/etc", "invalid model name")])
def test_the_default_must_be_a_model_in_the_store(model_copy, ref, message):
    root, _ = model_copy
    with pytest.raises(store.ModelLoadError, match=message):
        store.set_default(ref, root)
    assert not (root / "default.json").exists()


@pytest.mark.parametrize("content, message", [("{oops", "not valid JSON"), ('{"model": 3}', "does not name a model"),
                                              ('{"model": "../x"}', "invalid model name")])
def test_a_broken_default_record_is_one_clear_error(model_copy, content, message):
    root, _ = model_copy
    (root / "default.json").write_text(content)
    with pytest.raises(store.ModelLoadError, match=message):
        store.default_model(root)


def test_weights_of_another_dtype_are_named(model_copy):
    """A BF16 tensor (which numpy cannot hold) is named by the manifest check, before anything is read as numpy."""
    from safetensors.torch import load_file, save_file

    root, folder = model_copy
    t = load_file(str(folder / "model.safetensors"))
    t["embed.weight"] = t["embed.weight"].to(torch.bfloat16)
    save_file(t, str(folder / "model.safetensors"))
    card = json.loads((folder / "card.json").read_text())
    card["weights_sha256"] = store.file_sha256(folder / "model.safetensors")
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(store.ModelLoadError, match=r"tensor 'embed.weight' is BF16\[.*expected F32"):
        store.load("tiny", root)
