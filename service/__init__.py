"""charlstm: a character-level stacked-LSTM language model and the service that serves it.

Stages, each importing only earlier ones:
corpus -> training -> model store -> loader -> engine -> HTTP -> metrics.
"""

__version__ = "0.1.0"
