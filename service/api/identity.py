"""Who a client is: a named API key, or the client's address.

The same identity drives the engine's fairness between clients (`engine/fairness.py`), the session
quotas (`quotas.py`) and the per-client metrics. With `api_keys_file`, every key has a name, and the name
is the client, wherever it connects from; its optional weight and request limit come with it. Without
named keys (none, or the single `api_key` that every client shares), a client is its address: the
peer's, or behind a trusted proxy (`forwarded_allow_ips`) the one the proxy forwards, as uvicorn reads it.

The keys file is JSON, read once when the server starts (llama.cpp's server reads its `--api-key-file`
the same way):

    {"keys": [{"name": "alice", "key": "sk-alice-...", "weight": 2},
              {"name": "batch-jobs", "sha256": "<hex SHA-256 of the key>", "max_requests": 64}]}

A key may be given as its SHA-256 instead of in the clear, so the file need not hold secrets.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from ..engine.types import Client

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a metrics label value and a log word: kept plain
MAX_WEIGHT = 1000.0


@dataclass(frozen=True)
class ApiKey:
    name: str | None  # None: the single `api_key`, shared by clients told apart by address
    digest: bytes  # SHA-256 of the key
    weight: float = 1.0
    max_requests: int | None = None


class Keys:
    """The keys a server accepts. Empty: no key is asked for."""

    def __init__(self, entries: list[ApiKey]):
        self.entries = entries

    def __bool__(self) -> bool:
        return bool(self.entries)

    def match(self, token: bytes) -> ApiKey | None:
        """The key `token` is, compared by digest in constant time against every key."""
        digest, found = hashlib.sha256(token).digest(), None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry
        return found


def read_keys_file(path: Path) -> list[ApiKey]:
    """The named keys of a keys file; ValueError naming what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"api_keys_file {path}: {e}") from None
    items = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f'api_keys_file {path}: expected {{"keys": [{{"name": ..., "key": ...}}, ...]}} with at least one key')
    entries, names, digests = [], set(), set()
    for i, item in enumerate(items):
        where = f"api_keys_file {path}: keys.{i}"
        if not isinstance(item, dict) or set(item) - {"name", "key", "sha256", "weight", "max_requests"}:
            raise ValueError(f"{where}: an object with name, key or sha256, and optionally weight and max_requests")
        name = item.get("name")
        if not isinstance(name, str) or not NAME.match(name) or name == "anonymous" or name in names:
            raise ValueError(f"{where}.name: a unique name of letters, digits, '_', '.' or '-' (not 'anonymous')")
        if ("key" in item) == ("sha256" in item):
            raise ValueError(f"{where}: give key or sha256, one of them")
        if "key" in item:
            if not isinstance(item["key"], str) or len(item["key"]) < 16:
                raise ValueError(f"{where}.key: at least 16 characters")
            digest = hashlib.sha256(item["key"].encode()).digest()
        else:
            try:
                digest = bytes.fromhex(item["sha256"])
            except (TypeError, ValueError):
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"{where}.sha256: 64 hex digits")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= MAX_WEIGHT:
            raise ValueError(f"{where}.weight: a number above 0 and at most {MAX_WEIGHT:g}")
        limit = item.get("max_requests")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{where}.max_requests: an integer of at least 1")
        if digest in digests:
            raise ValueError(f"{where}: the same key as another entry")
        names.add(name)
        digests.add(digest)
        entries.append(ApiKey(name, digest, float(weight), limit))
    return entries


@functools.lru_cache(maxsize=8)
def keys_for(api_key: str | None, api_keys_file: str | None) -> Keys:
    """Every key the server accepts (read once: nothing on the request path touches the file)."""
    entries = read_keys_file(Path(api_keys_file)) if api_keys_file else []
    if api_key:
        entries.append(ApiKey(None, hashlib.sha256(api_key.encode()).digest()))
    return Keys(entries)


def client_of(request: Request) -> Client:
    """The client of a request: its named key (set by the auth middleware), else its address."""
    key: ApiKey | None = request.scope.get("state", {}).get("api_key")
    if key is not None and key.name is not None:
        return Client(id="key:" + key.name, label=key.name, weight=key.weight, max_requests=key.max_requests)
    return Client(id="addr:" + (request.client.host if request.client else "unknown"))
