"""The model: its vocabulary (`vocab.CharVocab`), its shape and the tensors a model file holds
(`config.CharLSTMConfig`, no torch), the network (`network.CharLSTM`, torch), the model store with its
cards (`store`: `load`, `save`, `LoadedModel`) and a text's score (`scores`).

Serving reads models as numpy arrays through `store`; only training, calibration, evaluation and the
torch backends build the torch module, so nothing here imports torch until `network` is asked for.
"""
