"""A flood of new sessions cannot evict everyone: creates, imports and forks are limited per client (API
key, else address), with 429 and Retry-After; refusals and evictions are counted. Clients come from
different loopback addresses (127.0.0.2, 127.0.0.3), which Linux routes like 127.0.0.1."""

from __future__ import annotations

import httpx
import pytest

from service.api.quotas import Quotas

from ..server import Server
from .test_api import assert_error

KEY = "quota-test-api-key"
RATE = 1e-4  # sessions a second: a bucket refills one token in 10,000 s


def from_address(address: str, **kw) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30, **kw)


@pytest.fixture(scope="module")
def capped(trained_store):
    """The finding's server: a cap of 20 sessions; each client may make 5 at once, then one every 10,000 s:
    no refill within a test, however slow the machine (the refill itself: the Quotas tests below)."""
    srv = Server(trained_store, max_sessions=20, session_create_burst=5, session_create_rate=RATE)
    yield srv
    srv.stop()


def test_a_flood_of_imports_cannot_evict_another_clients_session(capped):
    victim, flooder = from_address("127.0.0.2"), from_address("127.0.0.3")
    mine = victim.post(capped.url + "/sessions", json={"prompt": "KING:\n"}).json()["session_id"]
    theirs = flooder.post(capped.url + "/sessions", json={"prompt": "FOOL:\n"}).json()["session_id"]
    blob = flooder.get(f"{capped.url}/sessions/{theirs}/export").json()
    rejected_before = capped.metric("charlstm_rejected_requests_total", 'reason="rate_limited"')
    statuses = [flooder.post(capped.url + "/sessions/import", json={"data": blob["data"]}).status_code for _ in range(20)]
    assert statuses == [201] * 4 + [429] * 16  # 5 at once (the create took one), then the rate
    refused = flooder.post(capped.url + "/sessions/import", json={"data": blob["data"]})
    assert_error(refused, 429, "rate_limited")
    assert 9_000 <= int(refused.headers["retry-after"]) <= 10_000 and "session_create_rate" in refused.json()["error"]["message"]
    assert_error(flooder.post(f"{capped.url}/sessions/{theirs}/fork", json={}), 429, "rate_limited")
    assert victim.get(f"{capped.url}/sessions/{mine}").status_code == 200  # the victim's session stands
    assert victim.post(f"{capped.url}/sessions/{mine}/fork", json={}).status_code == 201  # and its owner's quota is its own
    assert capped.metric("charlstm_rejected_requests_total", 'reason="rate_limited"') == rejected_before + 18
    # continuing a session costs no quota: it makes none
    assert flooder.post(f"{capped.url}/sessions/{theirs}/generate", json={"max_new_tokens": 3}).status_code == 200


def test_evictions_at_the_cap_are_counted_and_take_the_least_recently_used(trained_store):
    srv = Server(trained_store, max_sessions=3)
    try:
        sids = [httpx.post(srv.url + "/sessions", json={}, timeout=30).json()["session_id"] for _ in range(3)]
        assert httpx.post(f"{srv.url}/sessions/{sids[0]}/generate", json={"max_new_tokens": 2}, timeout=30).status_code == 200
        assert srv.metric("charlstm_session_removals_total", 'reason="evicted"') == 0
        httpx.post(srv.url + "/sessions", json={}, timeout=30)  # at the cap: the least recently used idle session goes
        alive = [httpx.get(f"{srv.url}/sessions/{sid}", timeout=30).status_code for sid in sids]
        assert alive == [200, 404, 200] and srv.metric("charlstm_session_removals_total", 'reason="evicted"') == 1
    finally:
        srv.stop()


def test_with_an_api_key_the_quota_is_each_address_within_the_key(trained_store):
    """A server has one key: the key alone would put every client in one bucket."""
    srv = Server(trained_store, api_key=KEY, session_create_burst=2, session_create_rate=RATE)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        one, two = from_address("127.0.0.4", headers=auth), from_address("127.0.0.5", headers=auth)
        assert [one.post(srv.url + "/sessions", json={}).status_code for _ in range(3)] == [201, 201, 429]
        assert two.post(srv.url + "/sessions", json={}).status_code == 201  # another client with the same key
    finally:
        srv.stop()


def test_a_bucket_holds_its_burst_and_refills_at_its_rate():
    """The token bucket on an injected clock: exact, whatever the machine's speed."""
    now = [100.0]
    quotas = Quotas(rate_per_s=0.5, burst=3, clock=lambda: now[0])
    assert [quotas.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert quotas.take("a") == pytest.approx(2.0)  # empty: one token in 1 / 0.5 s
    assert quotas.take("b") == 0.0  # another client's bucket is its own
    now[0] += 1.0
    assert quotas.take("a") == pytest.approx(1.0)  # half a token back
    now[0] += 1.0
    assert quotas.take("a") == 0.0  # a whole token: spent
    now[0] += 60.0
    assert [quotas.take("a") for _ in range(3)] == [0.0] * 3  # refilled to the burst, never beyond it
    assert quotas.take("a") == pytest.approx(2.0)
