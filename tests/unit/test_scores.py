"""One scoring walk (service/model/scores.py) under every scorer: the torch module (evaluation), its logits
(calibration), a backend's own step (the quality check) and the engine (/score, in tests/http/test_api.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.training import calibrate, evaluate
from service.model import scores
from service.backends.quality import score_chunks_stepped
from service.backends.torch_fp32 import TorchBackend
from service.model.vocab import OutOfVocabularyError


def test_every_scorer_reads_the_text_the_same_way(tiny_model, play_file):
    text = play_file.read_text()[:1500]
    pieces = [text[i : i + 211] for i in range(0, len(text), 211)]
    module = evaluate.score_chunks(tiny_model.model, tiny_model.vocab, pieces, window=97)
    logits, targets = calibrate.logits_of(tiny_model.model, tiny_model.vocab, text, window=300)
    from_logits = scores.Score.of([scores.target_logprobs(logits.numpy(), targets.numpy())])
    stepped = score_chunks_stepped(TorchBackend(tiny_model.model), tiny_model.vocab, pieces)
    assert module.chars == from_logits.chars == stepped.chars == len(text) - 1
    assert list(targets.numpy()) == tiny_model.vocab.encode(text)[1:]
    assert from_logits.nats_total == pytest.approx(module.nats_total, rel=1e-6)
    assert stepped.nats_total == pytest.approx(module.nats_total, rel=1e-5)  # the fused step rounds otherwise
    assert 0 < module.bits_per_char < math.log2(len(tiny_model.vocab))


def test_the_walk_skips_or_replaces_unknown_characters_and_places_an_error_in_the_whole_text(tiny_model):
    vocab = tiny_model.vocab
    seen = []

    def predict(inputs):  # uniform logits: every character costs log V
        seen.extend(inputs)
        return np.zeros((len(inputs), len(vocab)), dtype=np.float32)

    skipped = scores.score_chunks(predict, vocab, ["ab~", "c~d"], window=2, unknown="skip")
    assert (skipped.chars, skipped.unknown_chars) == (3, 2) and seen == vocab.encode("abc")
    assert skipped.nats_per_char == pytest.approx(math.log(len(vocab)))
    replaced = scores.score_chunks(predict, vocab, ["ab~", "c~d"], unknown="replace", replacement=" ")
    assert (replaced.chars, replaced.unknown_chars) == (5, 2)
    with pytest.raises(OutOfVocabularyError) as e:
        scores.score_chunks(predict, vocab, ["abc", "d~"])
    assert e.value.unknown == {"~": [4]}
    assert scores.score_chunks(predict, vocab, ["a"]).chars == 0
    with pytest.raises(ValueError, match="at least two"):
        scores.logits_of(predict, vocab, "a")
