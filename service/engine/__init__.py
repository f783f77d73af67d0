"""The batching engine: one loop steps every running stream together. It knows nothing of HTTP."""
