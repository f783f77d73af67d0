"""Per-client quotas on making sessions: a token bucket per client (`identity.py`: a named API key, or
the client's address). Creating, importing or forking a session costs about a millisecond and no engine
work, and at the cap each new one evicts the least recently used idle session; without a quota one
client could evict every other client's sessions in seconds (20 imports in 0.11 s did, at a cap of 20).
The routes' dependency that takes a token is `deps.session_quota`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

MAX_CLIENTS = 100_000  # buckets kept; the least recently seen go first (a full bucket loses nothing by going)


class Quotas:
    def __init__(self, rate_per_s: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate_per_s, burst, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Spend one token of `client`'s bucket: 0 when it had one, else the seconds until it will."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)
            return wait
