"""Temperature calibration: the fit finds the temperature a text asks for, the fold divides the logits
and nothing else, and `charlstm calibrate` saves a next version that serves like any other model."""

import json
import math
import shutil

import httpx
import numpy as np
import pytest
import torch

from service.model import store
from service.training.calibrate import fit_temperature, folded, logits_of
from service.training.corpus import Corpus
from service.backends.selector import WEIGHTS_BACKEND, build
from service.model.network import CharLSTM, CharLSTMConfig

from ..conftest import make_play
from ..cli.test_cli import run


def cross_entropy_at(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Mean nats per character of softmax(logits / temperature), directly. logits (N, V), targets (N,)."""
    return float(torch.nn.functional.cross_entropy(logits.to(torch.float64) / temperature, targets))


@pytest.mark.parametrize("true_temperature", [0.6, 1.0, 1.7])
def test_the_fit_finds_the_temperature_the_characters_were_drawn_at(true_temperature):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(40_000, 30, generator=g)  # (N, V)
    targets = torch.multinomial(torch.softmax(logits / true_temperature, dim=1), 1, generator=g).squeeze(1)  # (N,)
    fit = fit_temperature(logits, targets)
    assert fit.temperature == pytest.approx(true_temperature, rel=0.03)
    assert fit.nats_after == pytest.approx(cross_entropy_at(logits, targets, fit.temperature), abs=1e-9)
    assert fit.nats_after <= fit.nats_before
    for off in (0.99, 1.01):  # a minimum: either side is worse
        assert cross_entropy_at(logits, targets, fit.temperature * off) > fit.nats_after


def test_the_fit_does_not_depend_on_how_many_rows_it_sums_at_once():
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(5_000, 12, generator=g)  # (N, V)
    targets = torch.multinomial(torch.softmax(logits / 1.3, dim=1), 1, generator=g).squeeze(1)  # (N,)
    whole, blocks = fit_temperature(logits, targets, rows=5_000), fit_temperature(logits, targets, rows=999)
    assert whole.temperature == pytest.approx(blocks.temperature, rel=1e-9)


@pytest.mark.parametrize("targets_of", [lambda z: z.argmax(1), lambda z: torch.randint(0, z.size(1), (z.size(0),))],
                         ids=["always-the-first-choice", "unrelated-to-the-logits"])
def test_a_text_no_temperature_calibrates_is_refused(targets_of):
    torch.manual_seed(2)
    logits = torch.randn(2_000, 10)  # (N, V)
    with pytest.raises(ValueError, match="broken for this text"):
        fit_temperature(logits, targets_of(logits))


@pytest.mark.parametrize("tie", [True, False])
def test_the_folded_model_divides_the_logits_and_keeps_every_state(tie):
    torch.manual_seed(3)
    model = CharLSTM(CharLSTMConfig(vocab_size=20, embed_dim=16, hidden_size=16, num_layers=2, tie_weights=tie)).eval()
    out = folded(model, 1.3)
    assert not out.config.tie_weights and out.head.weight.data_ptr() != out.embed.weight.data_ptr()
    assert torch.equal(out.embed.weight, model.embed.weight)  # the input side is the parent's, bit for bit
    x = torch.randint(0, 20, (3, 50))
    with torch.no_grad():
        (a, (ha, ca)), (b, (hb, cb)) = model(x), out(x)  # (3, 50, V) and states
    assert torch.equal(ha, hb) and torch.equal(ca, cb)
    torch.testing.assert_close(b, a / 1.3, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        folded(model, 0.0)


def test_calibrate_saves_the_next_version_measured_as_evaluate_measures_it(own_store, play_file, tmp_path):
    unseen = tmp_path / "unseen.txt"
    unseen.write_text(make_play(3_000, seed=99), encoding="utf-8")
    out = run("calibrate", "--store", str(own_store), "--model", "tiny@v1", "--text", str(play_file),
              "--test-text", str(unseen), "--set-default")
    assert out.returncode == 0, out.stderr
    assert "tiny@v2: tiny@v1 with its logits divided by T = " in out.stdout
    parent, child = store.load("tiny@v1", own_store), store.load("tiny@v2", own_store)
    assert store.default_model(own_store) == "tiny@v2"
    cal = child.card["calibration"]
    assert cal["parent"] == "tiny@v1" and cal["parent_weights_sha256"] == parent.card["weights_sha256"]
    assert child.card["training"] == parent.card["training"] and child.card["history"] == parent.card["history"]

    # the temperature is the fit on the parent's validation split, and nothing else
    validation = Corpus.read(play_file).split_as_trained(parent.card)[1]
    fit = fit_temperature(*logits_of(parent.model, parent.vocab, validation))
    assert cal["temperature"] == fit.temperature and cal["fitted_on"]["chars"] == len(validation) - 1

    # the card's figures are what `charlstm evaluate` says of each version
    def evaluate(ref, text, *split):
        res = run("evaluate", "--store", str(own_store), "--model", ref, "--text", str(text), *split, "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["nats_per_char"]

    assert child.card["metrics"]["val_nats_per_char"] == pytest.approx(evaluate("tiny@v2", play_file, "--split", "validation"), abs=1e-9)
    assert child.card["metrics"]["test_nats_per_char"] == pytest.approx(evaluate("tiny@v2", unseen), abs=1e-9)
    assert cal["before"]["val_nats_per_char"] == pytest.approx(evaluate("tiny@v1", play_file, "--split", "validation"), abs=1e-9)
    assert cal["before"]["test_nats_per_char"] == pytest.approx(evaluate("tiny@v1", unseen), abs=1e-9)
    assert child.card["metrics"]["val_nats_per_char"] <= cal["before"]["val_nats_per_char"]
    assert math.isclose(child.card["metrics"]["val_nats_per_char"], fit.nats_after, rel_tol=1e-4)

    # the service serves it like any model, and says what it serves
    from ..server import Server

    srv = Server(own_store, model="tiny@v2")
    try:
        info = httpx.get(srv.url + "/info").json()["model"]
        assert info["version"] == "v2" and info["calibration"] == {"parent": "tiny@v1", "temperature": cal["temperature"]}
        r = httpx.post(srv.url + "/generate", json={"prompt": "KING:", "max_new_tokens": 40, "seed": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["text"]) == 40
    finally:
        srv.stop()

    # the serving step takes the calibrated head as it is: the parent's logits over T, the same states
    for quantize in ("none", "int8"):
        a, b = build(WEIGHTS_BACKEND[quantize], parent, 1), build(WEIGHTS_BACKEND[quantize], child, 1)
        try:
            ids = np.array(child.vocab.encode("KING:"), dtype=np.int64)  # (5,) one row, five steps
            sa, sb = a.zero_state(1), b.zero_state(1)  # (2, L, 1, H)
            for t in range(len(ids)):
                sa, sb = a.step(ids[t : t + 1], sa), b.step(ids[t : t + 1], sb)
            assert sa.dtype == sb.dtype == np.float32 and np.array_equal(sa, sb)
            la, lb = a.logits(sa), b.logits(sb)
            assert la.dtype == lb.dtype == np.float32
            np.testing.assert_allclose(lb, la / cal["temperature"], rtol=1e-4, atol=1e-5)
        finally:
            a.close(), b.close()


def test_calibrate_fits_only_on_the_text_the_model_was_trained_on(own_store, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(make_play(5_000, seed=5), encoding="utf-8")
    out = run("calibrate", "--store", str(own_store), "--model", "tiny@v1", "--text", str(other))
    assert out.returncode == 2 and "is not the text this model was trained on" in out.stderr
    assert store.list_versions("tiny", own_store) == ["v1"]


def test_calibrate_brings_a_model_of_another_store_in_as_this_stores_next_version(own_store, play_file, tmp_path):
    """A run trained into its own store (its model is v1 there) is calibrated into the served store, where
    it becomes the name's next version; the card says which store its parent lives in."""
    elsewhere = tmp_path / "run_store"
    shutil.copytree(store.resolve("tiny@v1", own_store), elsewhere / "tiny" / "v1")
    before = store.list_versions("tiny", own_store)
    out = run("calibrate", "--store", str(own_store), "--model", str(elsewhere / "tiny" / "v1"), "--text", str(play_file))
    assert out.returncode == 0, out.stderr
    assert store.list_versions("tiny", own_store) == before + [f"v{len(before) + 1}"]
    cal = store.load(f"tiny@v{len(before) + 1}", own_store).card["calibration"]
    assert cal["parent"] == "tiny@v1" and cal["parent_store"] == str(elsewhere.resolve())
    assert cal["parent_weights_sha256"] == store.load("tiny@v1", own_store).card["weights_sha256"]
    inside = run("calibrate", "--store", str(own_store), "--model", "tiny@v1", "--text", str(play_file))
    assert inside.returncode == 0, inside.stderr
    assert "parent_store" not in store.load(f"tiny@v{len(before) + 2}", own_store).card["calibration"]


def test_train_with_calibrate_saves_the_trained_version_then_its_calibrated_copy(play_file, tmp_path):
    root, unseen = tmp_path / "store", tmp_path / "unseen.txt"
    unseen.write_text(make_play(3_000, seed=99), encoding="utf-8")

    def train(name, *args):
        return run("train", "--text", str(play_file), "--test-text", str(unseen), "--out", str(tmp_path / name),
                   "--store", str(root), "--hidden-size", "32", "--embed-dim", "32", "--tie-weights", "--batch-size", "8",
                   "--seq-len", "32", "--lr", "1e-2", "--eval-every", "40", "--variational-dropout", "0.3",
                   "--no-progress", "--calibrate", "--set-default", *args)

    out = train("cal", "--steps", "120")
    assert out.returncode == 0, out.stderr
    assert store.list_versions("cal", root) == ["v1", "v2"] and store.default_model(root) == "cal@v2"
    trained, calibrated = store.load("cal@v1", root), store.load("cal@v2", root)
    assert trained.card["config"]["tie_weights"] and "calibration" not in trained.card
    cal = calibrated.card["calibration"]
    assert cal["parent"] == "cal@v1" and cal["command"].startswith("charlstm train ") and "--calibrate" in cal["command"]
    validation = Corpus.read(play_file).split_as_trained(trained.card)[1]
    assert cal["temperature"] == fit_temperature(*logits_of(trained.model, trained.vocab, validation)).temperature
    assert (trained.path / store.PLOT_FILE).is_file() and (calibrated.path / store.PLOT_FILE).is_file()
    assert calibrated.card["metrics"]["test_text"]["name"] == "unseen.txt"

    # a model no temperature calibrates (barely trained: it should sharpen without bound) is saved as trained
    out = train("early", "--steps", "3", "--eval-every", "0", "--lr", "1e-4")
    assert out.returncode == 0 and "early@v1 was not calibrated" in out.stderr, out.stderr
    assert store.list_versions("early", root) == ["v1"] and store.default_model(root) == "early@v1"
