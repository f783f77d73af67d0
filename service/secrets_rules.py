"""What a configured secret must be: long enough, and not a manifest's placeholder text. One rule for
the session key (which signs every blob) and the API key, read by the settings and the command line."""

from __future__ import annotations

MIN_SESSION_KEY_BYTES = 32
PLACEHOLDER_WORDS = ("replace", "change-me", "changeme", "placeholder", "example")


def check_secret(value: str, env: str, min_bytes: int = 0) -> None:
    """Raise ValueError naming `env` and the rule, never the value."""
    size = len(value.encode("utf-8"))
    if size < min_bytes:
        raise ValueError(f"{env} is {size} bytes; it must be at least {min_bytes} (make one with: openssl rand -hex 32)")
    if any(word in value.lower() for word in PLACEHOLDER_WORDS):
        raise ValueError(f"{env} is a placeholder, not a key: set it to the output of openssl rand -hex 32")


def check_session_key(value: str) -> None:
    check_secret(value, "CHARLSTM_SESSION_KEY", MIN_SESSION_KEY_BYTES)
