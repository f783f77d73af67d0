"""The portable session format, `charlstm-session/1`: one session as a small signed binary value.

The same bytes go over HTTP (base64url in an export), into a shared store and onto disk. Layout,
little-endian, no pickle:

    magic "CLS1" | format version u8 | flags u8 (0) | layers u16 | hidden u32
    | seed u64 | counter u64 | position u64 | created_at f64 | weights sha256 (32 bytes)
    | state float32 x (2 * layers * hidden) | HMAC-SHA256 tag (32 bytes) over everything before it

The tag uses a server key, so a blob cannot be altered or forged without it; the values are checked
again after the tag (shapes against the model, every float finite), since a key can leak.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.types import EngineError
from ..secrets_rules import check_session_key
from .files import private_folder

FORMAT = "charlstm-session/1"
MAGIC = b"CLS1"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIQQQd32s")  # magic, version, flags, layers, hidden, seed, counter, position, created_at, sha256
TAG_BYTES = 32
MAX_STATE_FLOATS = 1 << 22  # 16 MiB of state: far above any model this serves, a bound on what is parsed


class InvalidSessionBlob(EngineError, ValueError, type="invalid_session_blob"):
    """The blob is malformed, truncated, altered, signed with another key or holds impossible values."""

    def __init__(self, message: str, param: str = "data"):
        super().__init__(message)
        self.param = param  # the request field at fault


class SessionBlobExpired(EngineError, ValueError):
    """The blob is intact but older than `session_blob_max_age_s`: a leaked export stops working."""

    type = "session_blob_expired"
    param = "data"


class ModelMismatch(EngineError, ValueError, type="model_mismatch"):
    """The blob is intact but belongs to other weights."""

    param = "data"


def blob_bytes(layers: int, hidden: int) -> int:
    """The exact size of a blob for a model with this state shape."""
    return _HEADER.size + 4 * 2 * layers * hidden + TAG_BYTES


def text_chars(layers: int, hidden: int) -> int:
    """The exact length of `to_text` of such a blob (base64url, no padding)."""
    return -(-4 * blob_bytes(layers, hidden) // 3)


@dataclass(frozen=True)
class SessionValue:
    """What a blob carries: everything needed to continue a session exactly."""

    state: np.ndarray  # (2, L, H) float32
    seed: int
    counter: int
    position: int
    created_at: float
    fingerprint: str  # sha256 hex of the weights


def encode(value: SessionValue, key: bytes) -> bytes:
    state = np.asarray(value.state, dtype=np.float32)
    _, layers, hidden = state.shape
    head = _HEADER.pack(MAGIC, VERSION, 0, layers, hidden, value.seed, value.counter, value.position, value.created_at,
                        bytes.fromhex(value.fingerprint))
    body = head + state.astype("<f4").tobytes()
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode(blob: bytes, key: bytes, fingerprint: str | None = None, layers: int | None = None,
           hidden: int | None = None, verify: bool = True, model: str = "this model") -> SessionValue:
    """Check and read a blob. `fingerprint`, `layers`, `hidden`: what the serving model expects; `model`
    names it in a mismatch. Raises InvalidSessionBlob, or ModelMismatch for an intact blob of other weights."""
    if len(blob) < _HEADER.size + TAG_BYTES:
        raise InvalidSessionBlob(f"the blob is truncated: {len(blob)} bytes is shorter than any session")
    body, tag = blob[:-TAG_BYTES], blob[-TAG_BYTES:]
    magic, version, flags, n_layers, n_hidden, seed, counter, position, created_at, sha = _HEADER.unpack_from(body)
    if magic != MAGIC or version != VERSION or flags != 0:
        raise InvalidSessionBlob(f"not a {FORMAT} blob")
    if verify and not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise InvalidSessionBlob("the blob's integrity tag does not match: it was changed, truncated or signed with another key")
    floats = 2 * n_layers * n_hidden
    if floats == 0 or floats > MAX_STATE_FLOATS or len(body) != _HEADER.size + 4 * floats:
        raise InvalidSessionBlob(f"the blob's state does not have the size its header gives ({n_layers} layers x {n_hidden})")
    if fingerprint is not None and sha.hex() != fingerprint:
        raise ModelMismatch(f"the session belongs to a model with weights {sha.hex()[:12]}, not to {model} "
                            f"(weights {fingerprint[:12]}): import it where that model is served")
    if (layers is not None and n_layers != layers) or (hidden is not None and n_hidden != hidden):
        raise InvalidSessionBlob(f"the blob's state is {n_layers} x {n_hidden}, the model's {layers} x {hidden}")
    state = np.frombuffer(body, dtype="<f4", offset=_HEADER.size).astype(np.float32).reshape(2, n_layers, n_hidden)
    if not np.isfinite(state).all() or not np.isfinite(created_at):
        raise InvalidSessionBlob("the blob holds values that are not finite numbers")
    return SessionValue(state=state.copy(), seed=seed, counter=counter, position=position,
                        created_at=created_at, fingerprint=sha.hex())


def check_age(value: SessionValue, max_age_s: float | None, now: float) -> None:
    """Refuse a blob exported more than `max_age_s` ago (None: any age). Read after the tag, so the
    time is the one the key signed; a time from the future beyond a minute of clock skew is refused too."""
    if max_age_s is None:
        return
    age = now - value.created_at
    if age > max_age_s:
        raise SessionBlobExpired(f"the session was exported {age:,.0f} s ago, more than session_blob_max_age_s={max_age_s:g}: "
                                 "export it again from a live session")
    if age < -60:
        raise InvalidSessionBlob(f"the blob says it was exported {-age:,.0f} s in the future")


def to_text(blob: bytes) -> str:
    return base64.urlsafe_b64encode(blob).decode("ascii").rstrip("=")


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def from_text(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text):
        raise InvalidSessionBlob("data is not base64url: use only A-Z, a-z, 0-9, - and _")
    text = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise InvalidSessionBlob(f"data is not base64url: {e}") from None


def load_or_create_key(configured: str | None, beside: str | None) -> tuple[bytes, str]:
    """The key that signs session blobs, and where it came from.

    `configured` (CHARLSTM_SESSION_KEY) wins; replicas share sessions by setting the same one. Else a
    random key is made once and kept in a file beside the session database (`<db>.key`, mode 600),
    so a restart still accepts its own blobs; with no database, the key lives as long as the process."""
    if configured:
        check_session_key(configured)
        return configured.encode("utf-8"), "CHARLSTM_SESSION_KEY"
    if not beside:
        return secrets.token_bytes(32), "a random key for this process only"
    path = Path(f"{beside}.key")
    if not path.exists():
        private_folder(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process made the key meanwhile: theirs stands
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:  # a key file an older version or a person left readable by others
        os.chmod(path, 0o600)
    return read_key_file(path), str(path)


def read_key_file(path: Path) -> bytes:
    """The key a server keeps beside its session database."""
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < 32:
        raise InvalidSessionBlob(f"the session key file {path} is damaged: delete it (its sessions' blobs then fail) or set CHARLSTM_SESSION_KEY")
    return key.encode("utf-8")
