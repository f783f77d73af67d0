"""The HTTP layer: FastAPI routes over the engine. Validation happens here; the engine trusts its inputs."""
