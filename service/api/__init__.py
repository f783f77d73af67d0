"""The HTTP layer: FastAPI routes over the engine. Validation happens here; the engine trusts its inputs.

Its face: `app.create_app(run_services)`, which serves with the `services.Services` the composition root
(service/server.py) builds; one folder a protocol (`native`, `openai`, `tokenizer`), one request path
they share (`validate`, `reader`, `sse`).
"""
