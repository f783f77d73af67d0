"""The benchmarks' one reader of the server's Server-Sent Events (an aiohttp response): each token's text."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator


async def token_texts(response) -> AsyncIterator[str]:
    """Each `token` event's text, as its line arrives (the other events are passed over)."""
    event = None
    async for raw in response.content:  # one SSE line at a time
        line = raw.decode()
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "token":
            yield json.loads(line[5:])["text"]
