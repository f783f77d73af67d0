"""The OpenAI Completions API beside the native one: its wire format (protocol.py) and its
translation onto the engine's one request type (serving.py). The engine never sees OpenAI's names."""
