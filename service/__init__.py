"""charlstm: a character-level stacked-LSTM language model and the service that serves it.

Packages, each importing only earlier ones (tests/unit/test_architecture.py checks it):
`training` (corpus -> training -> the store) and `model` (the network, the vocabulary, the store and its
cards, scoring) on the offline side; `backends` -> `engine` -> `sessions` -> `api` -> `metrics` on the
serving side, built by the composition root `server`; `cli`, the `charlstm` command, over both.
"""

__version__ = "0.1.0"
