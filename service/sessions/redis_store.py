"""The shared session store: sessions in Redis, so that any replica can continue any session.

Keys (under the prefix `charlstm:`; one Redis database holds one deployment's sessions):

    session:<id>   hash   blob (session_blob.encode with the session key: state, seed, counter,
                          position, created_at, weights sha256), version, ttl, last_used, id.
                          Its Redis expiry is the idle TTL, set again by every use (PEXPIRE).
    lease:<id>     string the lease holder's token, SET NX PX: it expires by itself when its holder died
    lru            zset   id -> last use: the order in which the cap evicts
    expiry         zset   id -> when the session key expires: count() and the index clean-up read it
    marker         hash   the weights sha256, model name and key check every replica must share

Every operation that reads and writes is one Lua script, so it is atomic across replicas and one
round trip; renew, commit and release act only while the lease key still holds the caller's token
(the shape of redis-py's Lock), and commit also compare-and-sets the version. A commit is idempotent:
the session remembers the token of the commit that made its version, so the same commit sent again
(redis-py resends a command whose reply was lost) reports success instead of a lost lease.

The cap: `create` at `max_sessions` (counted in the lru index) evicts the least recently used
session that holds no lease, in the same script; when every session is leased it raises
TooManySessions. Every replica must be given the same `max_sessions`. Idle sessions expire by
Redis's own key expiry; `purge_expired` only drops expired ids from the two indexes. Times are
Redis's clock (TIME), the one clock all replicas share.

Needs one Redis primary (not Redis Cluster: the scripts touch the indexes and other sessions' keys).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import replace
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import blob as session_blob
from .records import Lease, SessionRecord
from .store import RemovalCallback, SessionStore
from .errors import LeaseLost, SessionBusy, SessionNotFound, TooManySessions

log = logging.getLogger("charlstm.sessions")

PREFIX = "charlstm:"

# ---------------------------------------------------------------------------------------------- Lua
_LIB = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
-- A use: last_used is now and the key lives one TTL from now; both indexes follow.
local function touch(skey, id, lru, expiry, t)
  local ms = math.floor(tonumber(redis.call('HGET', skey, 'ttl')) * 1000)
  redis.call('HSET', skey, 'last_used', fmt(t))
  redis.call('PEXPIRE', skey, ms)
  redis.call('ZADD', lru, fmt(t), id)
  redis.call('ZADD', expiry, fmt(t + ms / 1000), id)
end
-- A leased session outlives its lease, whatever its TTL.
local function keep_alive(skey, id, expiry, t, ms)
  if redis.call('PTTL', skey) < ms then
    redis.call('PEXPIRE', skey, ms)
    redis.call('ZADD', expiry, fmt(t + ms / 1000), id)
  end
end
-- Drop from the indexes the ids whose session key Redis has expired; returns how many.
local function purge(lru, expiry, prefix, t)
  local n = 0
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', fmt(t), 'LIMIT', 0, 1000)) do
    local pttl = redis.call('PTTL', prefix .. 'session:' .. id)
    if pttl == -2 then
      redis.call('ZREM', lru, id)
      redis.call('ZREM', expiry, id)
      n = n + 1
    elseif pttl >= 0 then
      redis.call('ZADD', expiry, fmt(t + pttl / 1000), id)
    end
  end
  return n
end
"""

# KEYS: session, lru, expiry. ARGV: id, blob, ttl, max_sessions, prefix
_CREATE = _LIB + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local t = now()
local expired = purge(KEYS[2], KEYS[3], ARGV[5], t)
local evicted = 0
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  local victim, start = nil, 0
  while victim == nil do
    local ids = redis.call('ZRANGE', KEYS[2], start, start + 99)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      if redis.call('EXISTS', ARGV[5] .. 'lease:' .. id) == 0 then victim = id; break end
    end
    start = start + 100
  end
  if victim == nil then return {'full', tostring(expired)} end
  redis.call('DEL', ARGV[5] .. 'session:' .. victim)
  redis.call('ZREM', KEYS[2], victim)
  redis.call('ZREM', KEYS[3], victim)
  evicted = 1
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'blob', ARGV[2], 'version', '0', 'ttl', ARGV[3])
touch(KEYS[1], ARGV[1], KEYS[2], KEYS[3], t)
return {'ok', fmt(t), tostring(expired), tostring(evicted)}
"""

# KEYS: session, lease, expiry. ARGV: id, token, lease_ms
_LEASE = _LIB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {'busy'} end
local t = now()
keep_alive(KEYS[1], ARGV[1], KEYS[3], t, tonumber(ARGV[3]))
local h = redis.call('HMGET', KEYS[1], 'blob', 'version', 'ttl', 'last_used')
return {'ok', h[1], h[2], h[3], h[4], fmt(t)}
"""

# KEYS: session, lease, expiry. ARGV: id, token, lease_ms
_RENEW = _LIB + """
if redis.call('GET', KEYS[2]) ~= ARGV[2] or redis.call('EXISTS', KEYS[1]) == 0 then return {'lost'} end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local t = now()
keep_alive(KEYS[1], ARGV[1], KEYS[3], t, tonumber(ARGV[3]))
return {'ok', fmt(t)}
"""

# KEYS: session, lease, lru, expiry. ARGV: id, token, version read, blob, ttl
# A commit is idempotent: the one that made the current version, sent again by its holder (redis-py
# retries a command whose reply was lost), finds its own token, version and blob there and succeeds.
_COMMIT = _LIB + """
local v = tostring(tonumber(ARGV[3]) + 1)
if redis.call('GET', KEYS[2]) ~= ARGV[2] or redis.call('EXISTS', KEYS[1]) == 0 then
  local h = redis.call('HMGET', KEYS[1], 'committed_by', 'version', 'blob', 'last_used')
  if h[1] == ARGV[2] and h[2] == v and h[3] == ARGV[4] then return {'ok', v, h[4]} end
  return {'lost'}
end
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[3] then return {'changed'} end
redis.call('HSET', KEYS[1], 'blob', ARGV[4], 'version', v, 'ttl', ARGV[5], 'committed_by', ARGV[2])
redis.call('DEL', KEYS[2])
local t = now()
touch(KEYS[1], ARGV[1], KEYS[3], KEYS[4], t)
return {'ok', v, fmt(t)}
"""

# KEYS: session, lease, lru, expiry. ARGV: id, token
_RELEASE = _LIB + """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then touch(KEYS[1], ARGV[1], KEYS[3], KEYS[4], now()) end
return 1
"""

# KEYS: session, lease, lru, expiry. ARGV: id
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'busy' end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 'ok'
"""

# KEYS: lru, expiry. ARGV: prefix. Returns {purged, live sessions}.
_PURGE = _LIB + """
local t = now()
local n = purge(KEYS[1], KEYS[2], ARGV[1], t)
return {n, redis.call('ZCOUNT', KEYS[2], '(' .. fmt(t), '+inf')}
"""

# KEYS: expiry. Sessions whose key has not expired yet.
_COUNT = _LIB + """
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now()), '+inf')
"""

# KEYS: marker. ARGV: the session key's check, then name@version, weights sha256 pairs. The first replica to
# serve a model records its weights; a replica serving that name@version later must have the same ones (each
# session names its own weights, so replicas may serve different sets of models). A marker of the one-model
# layout (fields fingerprint and model) becomes that model's entry.
_CLAIM = """
local old = redis.call('HMGET', KEYS[1], 'fingerprint', 'model')
if old[1] and old[2] then
  redis.call('HSETNX', KEYS[1], 'model:' .. old[2], old[1])
  redis.call('HDEL', KEYS[1], 'fingerprint', 'model')
end
local key = redis.call('HGET', KEYS[1], 'key_check')
if key and key ~= ARGV[1] then return {'key'} end
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], 'model:' .. ARGV[i])
  if cur and cur ~= ARGV[i + 1] then return {'model', ARGV[i], cur, ARGV[i + 1]} end
end
redis.call('HSET', KEYS[1], 'key_check', ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], 'model:' .. ARGV[i], ARGV[i + 1]) end
return {'ok'}
"""


class StoreMismatch(RuntimeError):
    """This replica's model or session key differs from the one the shared store was set up with."""


def redacted(url: str) -> str:
    """The URL without its password, for logs and /ready."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisSessionStore(SessionStore):
    kind = "redis"

    def __init__(self, url: str, max_sessions: int, on_removed: RemovalCallback | None = None, *,
                 key: bytes, models: dict[str, str], timeout_s: float = 1.0, prefix: str = PREFIX):
        """`key` signs the blobs (replicas share it); `models`: name@version -> weights sha256 of every model
        this replica serves.

        `timeout_s` bounds every operation: connecting, and each reply. A read that times out is not
        retried (a Redis that accepts and never answers would only cost the budget again); a connection
        that breaks is retried once, on a fresh connection, which reconnects the pool after a Redis
        restart. So one operation takes at most about 2 x (connect + read) = 4 x timeout_s, and with the
        default 1 s a dead or hanging Redis costs a session call at most 4 s and then 503."""
        super().__init__(max_sessions, on_removed)
        self.url, self.key, self.models, self.prefix = url, key, dict(models), prefix
        self.timeout_s = timeout_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1,
                                                       supported_errors=(redis.ConnectionError,)),
                                           health_check_interval=30)
        s = self.client.register_script
        self._create, self._lease, self._renew, self._commit = s(_CREATE), s(_LEASE), s(_RENEW), s(_COMMIT)
        self._release, self._delete, self._purge, self._count, self._claim = (
            s(_RELEASE), s(_DELETE), s(_PURGE), s(_COUNT), s(_CLAIM))
        self._lru, self._expiry, self._marker = prefix + "lru", prefix + "expiry", prefix + "marker"
        self._claimed = False
        self._known_count = 0

    # ------------------------------------------------------------------ start-up
    def claim(self) -> bool:
        """Check (or, on a new store, write) the model marker. Raises StoreMismatch when this replica's
        weights or session key differ from the store's; returns False when Redis cannot be reached
        (then every later operation checks first, and the replica serves plain generation meanwhile)."""
        try:
            self._check_marker()
            return True
        except redis.RedisError as e:
            log.warning("the session store %s is unreachable at start (%s); sessions answer 503 until it is back",
                        redacted(self.url), e)
            return False

    def _check_marker(self) -> None:
        if self._claimed:
            return
        key_check = hmac.new(self.key, b"charlstm-session-key-check", hashlib.sha256).hexdigest()
        pairs = [x for ref, sha in sorted(self.models.items()) for x in (ref, sha)]
        answer = [_text(x) for x in self._claim(keys=[self._marker], args=[key_check, *pairs])]
        where = f"{redacted(self.url)} ({self._marker})"
        if answer[0] == "model":
            _, ref, theirs, mine = answer
            raise StoreMismatch(
                f"the session store {where} holds sessions of model {ref} with weights {theirs[:12]}, but this "
                f"replica serves {ref} with weights {mine[:12]}: replicas sharing a store must serve the same "
                f"weights under one name@version. Use another Redis database for this model (CHARLSTM_SESSION_STORE=redis://host:port/<db>), "
                f"or delete the key {self._marker} once no replica of the old model runs (its sessions become unusable)")
        if answer[0] == "key":
            raise StoreMismatch(
                f"the session store {where} was set up with another session key: every replica sharing it must set the "
                f"same CHARLSTM_SESSION_KEY")
        self._claimed = True

    # ------------------------------------------------------------------ the interface
    def create(self, record: SessionRecord) -> SessionRecord:
        self._check_marker()
        answer = self._create(keys=[self._session(record.id), self._lru, self._expiry],
                              args=[record.id, self._blob(record), repr(float(record.ttl_s)), self.max_sessions, self.prefix])
        status = _text(answer[0])
        if status == "exists":
            raise ValueError(f"session {record.id!r} exists already")
        self._report("expired", int(answer[1 if status == "full" else 2]))
        if status == "full":
            raise TooManySessions(f"all {self.max_sessions} sessions are in use")
        self._report("evicted", int(answer[3]))
        return replace(record, state=record.state.copy(), version=0, last_used=float(answer[1]))

    def get(self, session_id: str) -> SessionRecord:
        self._check_marker()
        fields = self.client.hgetall(self._session(session_id))
        if not fields or b"blob" not in fields:
            raise _not_found(session_id)
        return self._record(session_id, fields[b"blob"], fields[b"version"], fields[b"ttl"], fields[b"last_used"])

    def is_leased(self, session_id: str) -> bool:
        self._check_marker()
        with self.client.pipeline(transaction=True) as p:
            exists, leased = p.exists(self._session(session_id)).exists(self._lease_key(session_id)).execute()
        if not exists:
            raise _not_found(session_id)
        return bool(leased)

    def lease(self, session_id: str, lease_s: float) -> Lease:
        self._check_marker()
        token = secrets.token_hex(16)
        answer = self._lease(keys=[self._session(session_id), self._lease_key(session_id), self._expiry],
                             args=[session_id, token, _ms(lease_s)])
        status = _text(answer[0])
        if status == "missing":
            raise _not_found(session_id)
        if status == "busy":
            raise SessionBusy(f"session {session_id} is already generating; wait for that call to finish")
        _, blob, version, ttl, last_used, now = answer
        return Lease(session_id, token, self._record(session_id, blob, version, ttl, last_used), float(now) + lease_s)

    def renew(self, lease: Lease, lease_s: float) -> Lease:
        self._check_marker()
        answer = self._renew(keys=[self._session(lease.session_id), self._lease_key(lease.session_id), self._expiry],
                             args=[lease.session_id, lease.token, _ms(lease_s)])
        if _text(answer[0]) != "ok":
            raise _lease_lost(lease.session_id)
        return replace(lease, expires_at=float(answer[1]) + lease_s)

    def commit(self, lease: Lease, record: SessionRecord) -> SessionRecord:
        self._check_marker()
        sid = lease.session_id
        record = replace(record, id=sid, created_at=lease.record.created_at)
        answer = self._commit(keys=[self._session(sid), self._lease_key(sid), self._lru, self._expiry],
                              args=[sid, lease.token, str(lease.record.version), self._blob(record), repr(float(record.ttl_s))])
        status = _text(answer[0])
        if status == "lost":
            raise _lease_lost(sid)
        if status == "changed":
            raise LeaseLost(f"session {sid} changed since it was leased")
        return replace(record, state=record.state.copy(), version=int(answer[1]), last_used=float(answer[2]))

    def release(self, lease: Lease) -> None:
        self._check_marker()
        sid = lease.session_id
        self._release(keys=[self._session(sid), self._lease_key(sid), self._lru, self._expiry], args=[sid, lease.token])

    def delete(self, session_id: str) -> None:
        self._check_marker()
        status = _text(self._delete(keys=[self._session(session_id), self._lease_key(session_id), self._lru, self._expiry],
                                    args=[session_id]))
        if status == "missing":
            raise _not_found(session_id)
        if status == "busy":
            raise SessionBusy(f"session {session_id} is generating; delete it when the call has finished")
        self._report("deleted", 1)

    def purge_expired(self) -> int:
        self._check_marker()
        purged, live = self._purge(keys=[self._lru, self._expiry], args=[self.prefix])
        self._known_count = int(live)
        self._report("expired", int(purged))
        return int(purged)

    def count(self) -> int:
        self._check_marker()
        self._known_count = int(self._count(keys=[self._expiry]))
        return self._known_count

    def known_count(self) -> int:
        """The count from the last purge or count (the sweeper refreshes it every second): a scrape of
        /metrics never waits for Redis."""
        return self._known_count

    def describe(self) -> dict:
        return {"kind": self.kind, "url": redacted(self.url), "sessions": self.known_count(), "max_sessions": self.max_sessions,
                "models": sorted(self.models), "timeout_s": self.timeout_s}

    def serve(self, models: dict[str, str]) -> None:
        """The models served changed (a reload): the marker is checked again before the next operation."""
        self.models = dict(models)
        self._claimed = False

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ values
    def _session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _lease_key(self, session_id: str) -> str:
        return f"{self.prefix}lease:{session_id}"

    def _blob(self, record: SessionRecord) -> bytes:
        value = session_blob.SessionValue(state=record.state, seed=record.seed, counter=record.counter,
                                          position=record.position, created_at=record.created_at, fingerprint=record.model)
        return session_blob.encode(value, self.key)

    def _record(self, session_id: str, blob: bytes, version, ttl, last_used) -> SessionRecord:
        value = session_blob.decode(blob, self.key)
        return SessionRecord(id=session_id, state=value.state, seed=value.seed, counter=value.counter, position=value.position,
                             model=value.fingerprint, ttl_s=float(ttl), created_at=value.created_at,
                             last_used=float(last_used), version=int(version))

    def _report(self, reason: str, n: int) -> None:
        for _ in range(n):
            try:
                self.on_removed(reason)
            except Exception:  # a metrics callback must not break the store
                pass


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _not_found(session_id: str) -> SessionNotFound:
    return SessionNotFound(f"session {session_id!r} does not exist, has expired or was evicted")


def _lease_lost(session_id: str) -> LeaseLost:
    return LeaseLost(f"the lease on session {session_id} expired or was taken by another call")
