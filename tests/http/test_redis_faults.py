"""The shared store under network faults, against real sockets: a Redis that accepts connections and never
answers must not slow the probes or plain generation, and a commit whose reply was lost and that redis-py
sends again must report the commit it made."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from service.sessions.redis_store import _COMMIT, RedisSessionStore

from ..server import ROOT, Server, wait_until
from ..session_store_contract import FINGERPRINT, randn, record, same_state
from ..tcp_faults import ReplyDropper, Silent
from .test_api import assert_error

KEY = "redis-faults-share-this-session-key-0123456789"
COMMIT_SHA = hashlib.sha1(_COMMIT.encode()).hexdigest().encode()  # what EVALSHA names the commit script by


def arm_commit(redis_server, dropper) -> None:
    """Drop the reply of the next commit. The script is loaded first, so the dropped reply is the one of
    a commit that ran, not a NOSCRIPT answer that redis-py would follow with SCRIPT LOAD."""
    assert redis_server.client().script_load(_COMMIT).encode() == COMMIT_SHA
    dropper.arm(COMMIT_SHA)


@pytest.fixture
def silent():
    s = Silent()
    yield s
    s.close()


@pytest.fixture
def dropper(redis_server):
    proxy = ReplyDropper(redis_server.port)
    yield proxy
    proxy.close()


def probe_timeout_s() -> float:
    """The readiness probe's own timeout in deploy/kubernetes: what /ready must answer within to keep a replica in."""
    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    return float(deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["timeoutSeconds"])


def test_a_hanging_redis_never_holds_the_probe_or_plain_generation(trained_store, silent):
    """A Redis that never answers must not take the replica out: /ready answers within the probe's timeout."""
    probe = probe_timeout_s()
    srv = Server(trained_store, session_store=silent.url, session_key=KEY)
    try:
        wait_until(lambda: httpx.get(srv.url + "/ready", timeout=probe).json()["session_store"]["available"] is False,
                   what="the sweep to see the store hang")
        with ThreadPoolExecutor(24) as pool:
            calls = [pool.submit(httpx.post, srv.url + "/sessions", json={"prompt": "KING:"}, timeout=30) for _ in range(24)]
            ready = httpx.get(srv.url + "/ready", timeout=probe)  # with 24 calls stuck on the store
            assert ready.status_code == 200 and ready.json()["session_store"]["available"] is False
            plain = httpx.post(srv.url + "/generate", json={"prompt": "KING:", "max_new_tokens": 10}, timeout=5)
            assert plain.status_code == 200 and len(plain.json()["text"]) == 10
            for call in calls:
                assert_error(call.result(), 503, "session_store_unavailable")
        assert httpx.get(srv.url + "/ready", timeout=probe).status_code == 200
    finally:
        srv.stop()


def test_a_commit_whose_reply_was_lost_reports_the_commit_it_made(redis_server, dropper):
    redis_server.client().flushdb()
    store = RedisSessionStore(dropper.url, 10, key=b"k" * 32, models={"tiny@v1": FINGERPRINT})
    try:
        r = store.create(record())
        lease = store.lease(r.id, 30)
        advanced = lease.record.advanced(randn(), seed=3, counter=9, consumed=4)
        arm_commit(redis_server, dropper)
        committed = store.commit(lease, advanced)  # redis-py sends it again on a fresh connection
        assert dropper.dropped.is_set()
        assert committed.version == r.version + 1 and committed.counter == 9
        got = store.get(r.id)
        assert got.version == r.version + 1 and same_state(got.state, advanced.state) and not store.is_leased(r.id)
    finally:
        store.close()


def test_a_session_call_whose_commit_reply_was_lost_advances_once(trained_store, redis_server, dropper):
    redis_server.client().flushdb()
    srv = Server(trained_store, session_store=dropper.url, session_key=KEY)
    try:
        created = httpx.post(srv.url + "/sessions", json={"prompt": "KING:\n", "seed": 4}, timeout=30).json()
        arm_commit(redis_server, dropper)
        r = httpx.post(f"{srv.url}/sessions/{created['session_id']}/generate", json={"max_new_tokens": 12}, timeout=30)
        assert dropper.dropped.is_set() and r.status_code == 200, r.text
        assert r.json()["session"]["position"] == created["position"] + 12
        after = httpx.get(f"{srv.url}/sessions/{created['session_id']}", timeout=30).json()
        assert after["position"] == created["position"] + 12 and after["busy"] is False
    finally:
        srv.stop()
