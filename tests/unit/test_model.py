"""The model contract: state in, state out; stepping with carried state equals one call."""

import math

import pytest
import torch

import service.model.network
from service.model.network import CharLSTM
from service.model.config import CharLSTMConfig, tensor_shapes
from service.model.vocab import CharVocab, OutOfVocabularyError


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
    assert service.model.network.CharLSTMConfig is CharLSTMConfig  # its home needs no torch; the network module still has it
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
    for m in (model, untied):  # the stored tensors, counted without torch, are the module's parameters
        assert sum(math.prod(shape) for shape in tensor_shapes(m.config).values()) == m.num_parameters()


def test_forget_gate_bias_starts_at_one():
    model = CharLSTM(CharLSTMConfig(vocab_size=5, embed_dim=8, hidden_size=8, num_layers=2))
    for layer in range(2):
        b = getattr(model.lstm, f"bias_ih_l{layer}") + getattr(model.lstm, f"bias_hh_l{layer}")
        assert torch.equal(b[8:16], torch.ones(8)) and b[:8].abs().sum() == 0
    assert math.isclose(model.config.state_floats(), 2 * 2 * 8)


def small(**overrides) -> CharLSTM:
    values = dict(vocab_size=11, embed_dim=24, hidden_size=24, num_layers=3, dropout=0.0)
    values.update(overrides)
    return CharLSTM(CharLSTMConfig(**values))


def test_variational_mask_is_constant_along_time_and_differs_between_sequences(monkeypatch):
    import service.model.network as model_module

    masks = []
    real = model_module.variational_mask

    def recording(x, p):
        masks.append(real(x, p))
        return masks[-1]

    monkeypatch.setattr(model_module, "variational_mask", recording)
    torch.manual_seed(0)
    model = small(variational_dropout=0.5).train()
    model(torch.randint(0, 11, (6, 9)))
    assert len(masks) == 3 + 1  # the embedding output, before layers 2 and 3, and the top output
    for mask in masks:
        assert mask.shape == (6, 1, 24)  # one mask per sequence, broadcast over all 9 steps
        assert set(mask.unique().tolist()) <= {0.0, 2.0}
        assert any(not torch.equal(mask[0], mask[b]) for b in range(1, 6))
    # applied to a constant input the dropped features are the same at every step of a sequence
    x = torch.ones(6, 9, 24)
    dropped = x * real(x, 0.5)  # (B, T, D)
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))
    assert not torch.equal(dropped[0], dropped[1])


def test_the_layer_by_layer_training_path_is_the_same_lstm():
    torch.manual_seed(1)
    plain = small().train()
    regularised = small(weight_drop=1e-9).train()  # takes the layer-by-layer path; the mask keeps everything
    regularised.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 11, (4, 13))
    state = (torch.randn(3, 4, 24), torch.randn(3, 4, 24))
    a, (ha, ca) = plain(ids, state)
    b, (hb, cb) = regularised(ids, state)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ha, hb)
    torch.testing.assert_close(ca, cb)


def test_weight_drop_changes_training_outputs_and_never_evaluation_outputs():
    torch.manual_seed(2)
    plain = small()
    dropped = small(weight_drop=0.5, variational_dropout=0.3)
    dropped.load_state_dict(plain.state_dict())
    assert dropped.state_dict().keys() == plain.state_dict().keys()  # the stored weights are the same tensors
    before = {k: v.clone() for k, v in dropped.state_dict().items()}
    ids = torch.randint(0, 11, (4, 13))
    plain.train(), dropped.train()
    torch.manual_seed(3)
    first, _ = dropped(ids)
    torch.manual_seed(3)
    again, _ = dropped(ids)
    assert torch.equal(first, again)  # the masks come from torch's seeded generator
    assert not torch.allclose(first, plain(ids)[0], atol=1e-3)
    second, _ = dropped(ids)
    assert not torch.allclose(first, second, atol=1e-3)  # a new mask every call
    for k, v in dropped.state_dict().items():
        assert torch.equal(v, before[k]), k  # DropConnect never writes into the parameter
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(ids)[0], plain(ids)[0])


def test_config_rejects_regularisers_out_of_range():
    for name in ("variational_dropout", "weight_drop"):
        with pytest.raises(ValueError, match=name):
            CharLSTMConfig(**{name: 1.0})
        with pytest.raises(ValueError, match=name):
            CharLSTMConfig(**{name: -0.1})
