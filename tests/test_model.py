"""The model contract: state in, state out; stepping with carried state equals one call."""

import math

import pytest
import torch

from service.model import CharLSTM, CharLSTMConfig
from service.vocab import CharVocab, OutOfVocabularyError


def test_vocab_round_trip_and_unknown_characters_named_with_positions():
    vocab = CharVocab.from_text("hello world\n")
    assert vocab.decode(vocab.encode("low\nhold")) == "low\nhold"
    with pytest.raises(OutOfVocabularyError) as err:
        vocab.encode("hello, wörld,")
    assert err.value.unknown == {",": [5, 12], "ö": [8]}
    assert "','" in str(err.value) and "position 5, 12" in str(err.value) and "U+00F6" in str(err.value)


@pytest.mark.parametrize("tie", [False, True])
def test_stepping_with_carried_state_equals_one_call(tie):
    torch.manual_seed(0)
    model = CharLSTM(CharLSTMConfig(vocab_size=11, embed_dim=24, hidden_size=24, num_layers=3, dropout=0.3, tie_weights=tie)).eval()
    ids = torch.randint(0, 11, (3, 17))
    full, (h_full, c_full) = model(ids)
    state, steps = None, []
    for t in range(ids.size(1)):
        logits, state = model(ids[:, t : t + 1], state)
        steps.append(logits)
    stepped = torch.cat(steps, dim=1)
    assert stepped.shape == full.shape == (3, 17, 11)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[0], h_full)
    torch.testing.assert_close(state[1], c_full)
    # an explicit zero state is the same as none
    zero = model.initial_state(3)
    torch.testing.assert_close(model(ids, zero)[0], full)


def test_state_is_not_hidden_in_the_module():
    model = CharLSTM(CharLSTMConfig(vocab_size=5, embed_dim=8, hidden_size=8, num_layers=1)).eval()
    ids = torch.tensor([[1, 2, 3]])
    first, _ = model(ids)
    model(torch.tensor([[4, 4, 4, 4]]))  # an unrelated call in between
    second, _ = model(ids)
    assert torch.equal(first, second)


def test_config_rejects_impossible_architectures():
    with pytest.raises(ValueError, match="tie_weights"):
        CharLSTMConfig(embed_dim=16, hidden_size=32, tie_weights=True)
    with pytest.raises(ValueError, match="dropout"):
        CharLSTMConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown model config"):
        CharLSTMConfig.from_dict({"vocab_size": 3, "colour": "red"})


def test_tied_head_shares_the_embedding():
    model = CharLSTM(CharLSTMConfig(vocab_size=7, embed_dim=16, hidden_size=16, tie_weights=True))
    assert model.head.weight is model.embed.weight
    untied = CharLSTM(CharLSTMConfig(vocab_size=7, embed_dim=16, hidden_size=16))
    assert model.num_parameters() == untied.num_parameters() - 7 * 16


def test_forget_gate_bias_starts_at_one():
    model = CharLSTM(CharLSTMConfig(vocab_size=5, embed_dim=8, hidden_size=8, num_layers=2))
    for layer in range(2):
        b = getattr(model.lstm, f"bias_ih_l{layer}") + getattr(model.lstm, f"bias_hh_l{layer}")
        assert torch.equal(b[8:16], torch.ones(8)) and b[:8].abs().sum() == 0
    assert math.isclose(model.config.state_floats(), 2 * 2 * 8)
